"""σ calibration for a whole planned run, and ε from a recorded mechanism history.

A history is the list of (noise_multiplier σ, sample_rate q, steps) entries of the
Poisson-subsampled Gaussian mechanism, exactly as Opacus' RDP accountant records it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]


def poisson_plan(num_records: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch for Poisson sampling with an expected batch size.

    Matches Opacus' DPDataLoader built from a loader of ceil(n / batch_size) batches.
    """
    steps_per_epoch = max(1, math.ceil(num_records / batch_size))
    return 1.0 / steps_per_epoch, steps_per_epoch


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest σ (RDP) such that `steps` steps at `sample_rate` spend at most target_epsilon."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    )


def epsilon_spent(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Cumulative ε (RDP accountant) of every mechanism entry in the history; 0 if none."""
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0
