"""One hospital's DP-SGD session with Opacus, continuing its accountant across rounds.

`grad_sample_mode` picks how Opacus clips per sample: `hooks` materialises every
per-sample gradient; `ghost` (ghost clipping) computes only per-sample norms and takes a
second backward pass with the clipping factors. Same mechanism, same σ, q, steps and ε.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.privacy.accounting import History, epsilon_spent

# Opacus' hooks fire on the first layer although images need no gradient: expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass
class PrivateSession:
    """The DP-wrapped model, optimizer and Poisson loader, plus the live accountant;
    `ghost_loss` is Opacus' ghost-clipping criterion (None in `hooks` mode), whose loss's
    backward() runs both passes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    ghost_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def history(self) -> History:
        return [(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]

    def epsilon(self, delta: float) -> float:
        """Cumulative ε of this hospital, everything before this session included."""
        return epsilon_spent(self.history, delta)

    def unwrapped_state(self) -> dict[str, torch.Tensor]:
        return self.model._module.state_dict()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    history: History,
    noise_generator: torch.Generator,
    grad_sample_mode: str = "hooks",
) -> PrivateSession:
    """Wrap for DP-SGD with Poisson sampling; the accountant resumes from `history`.

    The accountant is never reset: it starts from everything this hospital spent before.
    The loss is the batch mean (binary cross-entropy on one logit) in both modes: Opacus
    rescales per-sample gradients by the batch and divides the noisy sum of clipped ones by
    the expected batch size, so a step is an average gradient, as without DP (with "sum" it
    would be B× larger — harmless for Adam, a B× learning rate for SGD).
    """
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(history)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=nn.BCEWithLogitsLoss(reduction="mean"),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        loss_reduction="mean",
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, ghost_loss, private_loader = wrapped
        return PrivateSession(private_model, private_optimizer, private_loader, engine, ghost_loss)
    private_model, private_optimizer, private_loader = wrapped
    return PrivateSession(private_model, private_optimizer, private_loader, engine)
