"""One hospital's DP-SGD session with Opacus, continuing its accountant across rounds.

`grad_sample_mode` picks how Opacus clips per sample: `hooks` materialises every
per-sample gradient; `ghost` (ghost clipping) computes only per-sample norms and takes a
second backward pass with the clipping factors. Same mechanism, same σ, q, steps and ε.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.internals import set_opacus_clip_norm, set_opacus_loss_reduction, unwrap_opacus_module
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

    def set_clip_norm(self, max_grad_norm: float) -> None:
        """Clip to `max_grad_norm` from the next physical batch on; the noise of the next
        step is σ times it."""
        set_opacus_clip_norm(self.optimizer, self.model, max_grad_norm)

    def unwrapped_state(self) -> dict[str, torch.Tensor]:
        return unwrap_opacus_module(self.model).state_dict()

    @contextlib.contextmanager
    def physical_batches(self, max_physical_batch_size: int | None) -> Iterator[DataLoader]:
        """The Poisson loader, or (when a bound is given) Opacus' BatchMemoryManager over it:
        each logical batch is split into physical ones of at most that many examples, whose
        clipped gradients are summed before the one noisy step. Sampling, steps and
        accounting are those of the logical batches."""
        if max_physical_batch_size is None:
            yield self.loader
            return
        with BatchMemoryManager(
            data_loader=self.loader, max_physical_batch_size=max_physical_batch_size, optimizer=self.optimizer
        ) as loader:
            yield loader


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
    Per-sample gradients are those of a summed loss (exact for split physical batches and
    averaged augmented views); the step divides the noisy sum by the expected batch size, so
    a learning rate means the same with and without DP (Opacus' "sum" alone would make an
    SGD step B× larger under DP).
    """
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.load_state_dict({"history": list(history), "mechanism": engine.accountant.mechanism()})
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=nn.BCEWithLogitsLoss(reduction="sum"),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        loss_reduction="sum",
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, ghost_loss, private_loader = wrapped
    else:
        (private_model, private_optimizer, private_loader), ghost_loss = wrapped, None
    set_opacus_loss_reduction(private_optimizer, "mean")  # noisy sum / expected batch size
    return PrivateSession(private_model, private_optimizer, private_loader, engine, ghost_loss)
