"""What one hospital keeps on its own disk: its σ and every DP-SGD round it ran.

A hospital writes this file (atomically, under an OS lock) after training and *before* its
update leaves, so a crash, a timeout, a killed simulation or a second process training the
same hospital never loses privacy it spent. A round run again after a resume is the same
mechanism with the same randomness on the same inputs: if it releases bit-identical weights
(same digest) it reveals nothing new and is recorded once; if the release differs in any
bit, it is recorded as a further round of spending.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpriv.errors import FedprivError
from fedpriv.privacy.accounting import History


#: The round number under which a hospital records its GAN training (before round 1); a
#: federated GAN's earlier rounds come before it (gan_round_id).
SYNTHETIC_ROUND = 0


def gan_round_id(gan_round: int, gan_rounds: int) -> int:
    """The round under which a hospital records GAN round `gan_round` (1-based) of
    `gan_rounds`: all before the classifier's round 1, the last at SYNTHETIC_ROUND."""
    return SYNTHETIC_ROUND - gan_rounds + gan_round


def is_gan_round(round: int) -> bool:
    """Whether a recorded session trained a GAN (rather than the classifier)."""
    return round <= SYNTHETIC_ROUND


@dataclass(frozen=True)
class SpentRound:
    """One DP-SGD session: the server round it served (≤ SYNTHETIC_ROUND: the GAN's
    discriminator; σ = 0 when the GAN was trained without DP), the mechanism, and a digest of
    what it released."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    release_digest: str


@dataclass
class HospitalPrivacyState:
    noise_multiplier: float | None = None  # calibrated once, for the whole planned run
    spent: list[SpentRound] = field(default_factory=list)

    @property
    def history(self) -> History:
        return [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spent]

    def record(self, spent: SpentRound) -> None:
        """Add a session, unless it replays an identical release of the same round."""
        if any(s == spent for s in self.spent):
            return
        self.spent.append(spent)

    @classmethod
    def load(cls, path: Path) -> HospitalPrivacyState:
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(raw["noise_multiplier"], [SpentRound(**s) for s in raw["spent"]])
        except (ValueError, KeyError, TypeError) as error:
            raise FedprivError(
                f"{path}: a hospital's privacy state is unreadable ({error}); its spent ε is unknown, "
                "so this run cannot continue — start a new run directory"
            ) from None

    @classmethod
    def record_at(cls, path: Path, spent: SpentRound, noise_multiplier: float | None = None) -> HospitalPrivacyState:
        """Add a session to the state on disk (setting σ when not yet set); return the state.

        Read, changed and written under an OS lock on a file next to it: sessions that two
        processes record at once are both kept, never one overwritten by the other."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
            state = cls.load(path)
            if state.noise_multiplier is None:
                state.noise_multiplier = noise_multiplier
            state.record(spent)
            state.save(path)
        return state

    def save(self, path: Path) -> None:
        """Write to a temporary file and rename: a kill mid-write leaves the previous state."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"noise_multiplier": self.noise_multiplier, "spent": [vars(s) for s in self.spent]}
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "w") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


def release_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the released weights (names and exact bytes)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def history_metrics(state: HospitalPrivacyState) -> dict[str, list]:
    """The state as flat lists, the form a Flower MetricRecord can carry to the server."""
    return {
        "history_round": [s.round for s in state.spent],
        "history_sigma": [s.noise_multiplier for s in state.spent],
        "history_rate": [s.sample_rate for s in state.spent],
        "history_steps": [s.steps for s in state.spent],
    }


def history_from_metrics(metrics: dict) -> list[tuple[int, float, float, int]]:
    """(round, σ, q, steps) per session, from history_metrics' lists."""
    keys = ("history_round", "history_sigma", "history_rate", "history_steps")
    if keys[0] not in metrics:
        return []
    return [(int(r), float(s), float(q), int(n)) for r, s, q, n in zip(*(metrics[k] for k in keys))]
