"""Schedules over the planned optimizer steps of a whole run: the learning rate
(`training.lr_schedule`) and the DP clipping norm (`privacy.final_max_grad_norm`).

A hospital knows the round number and the plan (rounds × its steps per round), so it can
continue the run's schedules where the previous round left them, without any shared state."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Factor of the base learning rate at step t of T planned steps.
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
}


@dataclass(frozen=True)
class StepPlan:
    """Where this round's first optimizer step falls in the run, and how many the run plans."""

    first_step: int
    total_steps: int

    @classmethod
    def of_round(cls, server_round: int, rounds: int, steps_per_round: int) -> StepPlan:
        return cls((server_round - 1) * steps_per_round, max(rounds * steps_per_round, 1))


def on_every_step(optimizer: torch.optim.Optimizer, first_step: int, action: Callable[[int], None]) -> None:
    """Call `action(t)` before every real step of `optimizer`, t counting from `first_step`
    (a step pre-hook on the plain optimizer: split physical batches, whose steps Opacus
    skips, do not advance it)."""
    position = [first_step]

    def before_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        action(position[0])
        position[0] += 1

    optimizer.register_step_pre_hook(before_step)


def follow_lr_schedule(optimizer: torch.optim.Optimizer, name: str, base_lr: float, plan: StepPlan) -> None:
    """Set the learning rate of every parameter group before each step."""
    factor = SCHEDULES[name]

    def set_lr(step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * factor(step, plan.total_steps)

    on_every_step(optimizer, plan.first_step, set_lr)


def geometric_clip_norm(start: float, final: float, step: int, total_steps: int) -> float:
    """The clipping norm at step t: geometric from `start` (t = 0) to `final` (t = T)."""
    return start * (final / start) ** (min(step, total_steps) / total_steps)


def follow_clip_schedule(
    optimizer: torch.optim.Optimizer, set_clip_norm: Callable[[float], None], start: float, final: float, plan: StepPlan
) -> None:
    """Decay DP-SGD's clipping norm geometrically over the run. Opacus clips each physical
    batch as it arrives and adds noise of std σ·C at the real step, so the norm of step t
    is set when step t − 1 is taken (and now, for this round's first step): every example
    of a logical batch is clipped to the norm its noise is scaled by — the mechanism keeps
    its noise multiplier σ, and ε does not change."""
    set_clip_norm(geometric_clip_norm(start, final, plan.first_step, plan.total_steps))
    on_every_step(optimizer, plan.first_step, lambda step: set_clip_norm(geometric_clip_norm(start, final, step + 1, plan.total_steps)))
