"""fedpriv: simulate hospitals training one cancer classifier with federated DP-SGD."""

import os

# Flower's telemetry is off unless a user turns it on explicitly (set before flwr loads).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedpriv.errors import FedprivError  # noqa: E402

__all__ = ["FedprivError"]
__version__ = "0.1.0"
