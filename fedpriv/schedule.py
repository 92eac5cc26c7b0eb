"""Learning-rate schedules over the planned optimizer steps of a whole run.

A hospital knows the round number and the plan (rounds × its steps per round), so it can
continue the run's schedule where the previous round left it, without any shared state."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: Factor of the base learning rate at step t of T planned steps.
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
}


def follow_schedule(
    optimizer: torch.optim.Optimizer, name: str, base_lr: float, first_step: int, total_steps: int
) -> torch.utils.hooks.RemovableHandle:
    """Set the learning rate before every real optimizer step (a step pre-hook, so split
    physical batches, whose steps Opacus skips, do not advance it), from `first_step` on."""
    factor = SCHEDULES[name]
    position = [first_step]

    def before_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        for group in opt.param_groups:
            group["lr"] = base_lr * factor(position[0], max(total_steps, 1))
        position[0] += 1

    return optimizer.register_step_pre_hook(before_step)
