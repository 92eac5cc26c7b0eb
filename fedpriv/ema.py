"""Exponential moving average of the global weights over rounds (evaluation.ema).

Post-processing of released models, so it costs no privacy; it smooths the noise that DP
adds to every round's update (De et al. 2022)."""

from __future__ import annotations

import torch


def update_average(average: dict[str, torch.Tensor] | None, weights: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """decay·average + (1 − decay)·weights for floating-point entries (the first call copies
    `weights`); integer entries (counters) take the newest value. An entry equal to its average
    (a frozen backbone) keeps it to the bit, where the float sum could move its last bit."""
    if average is None:
        return {k: v.detach().clone() for k, v in weights.items()}
    return {
        k: (average[k] if torch.equal(average[k], v) else decay * average[k] + (1 - decay) * v)
        if v.is_floating_point() else v.detach().clone()
        for k, v in weights.items()
    }
