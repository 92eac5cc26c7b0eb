"""σ calibration for a whole planned run, and ε from a recorded mechanism history.

A history is the list of (noise_multiplier σ, sample_rate q, steps) entries of the
Poisson-subsampled Gaussian mechanism, exactly as Opacus' RDP accountant records it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

History = list[tuple[float, float, int]]


def poisson_plan(num_records: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch for Poisson sampling with an expected batch size.

    Matches Opacus' DPDataLoader built from a loader of ceil(n / batch_size) batches.
    """
    steps_per_epoch = max(1, math.ceil(num_records / batch_size))
    return 1.0 / steps_per_epoch, steps_per_epoch


#: Above this σ a plan is refused: the target is below what the RDP→(ε, δ) conversion can
#: certify (about ln(1/δ)/62 with Opacus' orders), and searching further would never end.
MAX_NOISE_MULTIPLIER = 1e4


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, prior: tuple[tuple[float, float, int], ...] = ()
) -> float:
    """Smallest σ (RDP, to within ε tolerance 0.005) such that `steps` steps at
    `sample_rate`, composed with the `prior` mechanisms already applied to the same records,
    spend at most target_epsilon — the search of Opacus' get_noise_multiplier, bounded so
    that an unreachable target is an error, not an endless loop.

    Cached: a process asks for the same plan more than once (budget pre-check, strategy,
    summary)."""

    def spent(sigma: float) -> float:
        return epsilon_spent([*prior, (sigma, sample_rate, steps)], delta)

    low, high = 0.0, 10.0
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            from fedpriv.errors import FedprivError

            raise FedprivError(
                f"privacy.target_epsilon={target_epsilon:g} cannot be reached with δ={delta:g} over {steps} "
                f"steps at sample rate {sample_rate:.3g} (it needs σ > {MAX_NOISE_MULTIPLIER:g}); raise the "
                "target or δ, or train fewer steps"
            )
    while target_epsilon - spent(high) > 0.005:
        middle = (low + high) / 2
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return float(high)


def epsilon_spent(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Cumulative ε of every mechanism entry in the history; 0 if none, ∞ if any entry
    added no noise (σ = 0: e.g. a GAN trained without DP whose images left the hospital).

    The same computation as Opacus' RDPAccountant (RDP adds up over steps, then the RDP →
    (ε, δ) conversion over its default orders), with the per-step RDP curve cached per
    (σ, q), so a ledger with many rounds stays cheap.
    """
    entries = [(float(s), float(q), int(n)) for s, q, n in history]
    if not entries:
        return 0.0
    if any(s == 0 and n > 0 for s, _, n in entries):
        return math.inf
    rdp = sum(_rdp_per_step(s, q) * n for s, q, n in entries)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    return np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )
