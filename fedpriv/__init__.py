"""fedpriv: simulate hospitals training one cancer classifier with federated DP-SGD."""

import os
from pathlib import Path

# Flower's telemetry is off unless a user turns it on explicitly (set before flwr loads).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedpriv.errors import FedprivError  # noqa: E402

#: The Hydra config tree (the only place defaults live): configs/ of the checkout, reached
#: through the fedpriv/configs link, or the copy an installed wheel carries there; where the
#: link is not carried (a Flower App Bundle leaves links out), the configs/ beside fedpriv/.
_LINKED = Path(__file__).parent / "configs"
CONFIG_DIR = (_LINKED if _LINKED.is_dir() else Path(__file__).parent.parent / "configs").resolve()

__all__ = ["FedprivError"]
__version__ = "0.1.0"
