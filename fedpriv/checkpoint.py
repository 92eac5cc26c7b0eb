"""The server's checkpoint after every round: everything a killed run needs to continue.

Global weights (their moving average under evaluation.ema, the best validation round's
model under evaluation.select=best_val), the strategy's state (its optimiser moments and
clipping norm), the ledger, the metrics so far and the RNG states the server draws from
(numpy: client-level DP noise; Python: client sampling). Hospitals keep their own privacy
state on their own disk (fedpriv.privacy.hospital_state). Written to a temporary file and
renamed, so a kill while writing leaves the previous checkpoint usable.

A checkpoint holds tensors, numbers, strings and containers of them only: no library's
objects, so it reads with torch.load(weights_only=True) and a library upgrade cannot break
a resume. The strategy's state goes into a freshly built strategy
(fedpriv.internals.restore_strategy_state).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpriv.errors import FedprivError
from fedpriv.internals import flower_rng_state, restore_flower_rng_state, strategy_state

FILENAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int  # the last completed round
    weights: dict[str, torch.Tensor]
    lines: list[dict]  # metrics.jsonl lines of rounds 1..round
    ledger: dict  # PrivacyLedger.to_dict
    strategy: dict  # fedpriv.internals.strategy_state
    rngs: dict  # fedpriv.internals.flower_rng_state
    settings: dict  # the run's settings (asdict), to refuse resuming with another config
    ema: dict[str, torch.Tensor] | None = None  # the moving average of the weights (evaluation.ema)
    selected: dict | None = None  # evaluation.select=best_val: {round, val_auroc, weights} of the best round so far

    @classmethod
    def capture(cls, server_round: int, weights, lines, ledger: dict, strategy, settings: dict, ema=None, selected=None) -> Checkpoint:
        return cls(
            server_round, weights, list(lines), ledger, strategy_state(strategy), flower_rng_state(), settings, ema, selected
        )

    def restore_rngs(self) -> None:
        restore_flower_rng_state(self.rngs)

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
            payload = torch.load(path, weights_only=True)  # tensors and plain data only: never a library's objects
            return cls(**payload)
        except pickle.UnpicklingError:
            raise FedprivError(
                f"{path} holds more than tensors and plain data (a checkpoint of an older fedpriv, or damaged); "
                "it cannot be resumed"
            ) from None
        except (OSError, EOFError, RuntimeError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise FedprivError(f"{path} is unreadable ({reason}); it cannot be resumed") from None
