"""The server's checkpoint after every round: everything a killed run needs to continue.

Global weights (their moving average under evaluation.ema, the best validation round's
model under evaluation.select=best_val), the strategy (its optimiser moments and clipping norm included), the
ledger, the metrics so far and the RNG states the server draws from (numpy: client-level DP
noise; Python: client sampling). Hospitals keep their own privacy state on their own disk
(fedpriv.privacy.hospital_state). Written to a temporary file and renamed, so a kill while
writing leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpriv.errors import FedprivError

FILENAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int  # the last completed round
    weights: dict[str, torch.Tensor]
    lines: list[dict]  # metrics.jsonl lines of rounds 1..round
    ledger: dict  # PrivacyLedger.to_dict
    strategy: bytes  # the pickled strategy
    numpy_rng: tuple
    python_rng: tuple
    settings: dict  # the run's settings (asdict), to refuse resuming with another config
    ema: dict[str, torch.Tensor] | None = None  # the moving average of the weights (evaluation.ema)
    selected: dict | None = None  # evaluation.select=best_val: {round, val_auroc, weights} of the best round so far

    @classmethod
    def capture(cls, server_round: int, weights, lines, ledger: dict, strategy, settings: dict, ema=None, selected=None) -> Checkpoint:
        return cls(
            server_round, weights, list(lines), ledger, pickle.dumps(strategy),
            np.random.get_state(), random.getstate(), settings, ema, selected,
        )

    def restore_rngs(self) -> None:
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)

    def save(self, run_dir: Path) -> None:
        target = Path(run_dir) / FILENAME
        temporary = target.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "wb") as handle:
            torch.save(vars(self), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint | None:
        """The last checkpoint in run_dir, or None when the run never finished a round."""
        path = Path(run_dir) / FILENAME
        if not path.exists():
            return None
        try:
            payload = torch.load(path, weights_only=False)
            return cls(**payload)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, TypeError) as error:
            raise FedprivError(f"{path} is unreadable ({error}); it cannot be resumed") from None
