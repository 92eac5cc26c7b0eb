"""Local training epochs and prediction, shared by private and non-private hospitals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpriv.data.records import ImageRecords
from fedpriv.settings import TrainingSettings


class RecordDataset(Dataset):
    """Torch view of ImageRecords (2D images or 3D volumes); `augment` applies random 90°
    rotations and flips in the last two axes (mass patches have no canonical orientation)."""

    def __init__(self, records: ImageRecords, augment: bool) -> None:
        self.images = torch.from_numpy(records.images)
        self.labels = torch.from_numpy(records.labels.astype(np.float32))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.augment:
            image = torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - 0.5) / 0.5, self.labels[i]


def make_optimizer(model: nn.Module, settings: TrainingSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    after_step: Callable[[], None] | None = None,
    ghost_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Run `epochs` passes on the model's device; return the mean per-example loss.

    The loss is the batch mean, with or without DP (fedpriv.privacy.engine uses Opacus'
    loss_reduction="mean"). Empty Poisson batches still take a (noisy) step. `after_step`
    runs after every optimizer step (e.g. FedProx's proximal pull). `ghost_loss`: Opacus'
    ghost-clipping criterion (mean BCE), whose backward() clips per sample in two passes.
    """
    model.train()
    device = _device_of(model)
    total, count = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:  # Poisson sampled nobody: the DP step is noise only
                _set_empty_grads(model, ghost=ghost_loss is not None)
                optimizer.step()
                if after_step:
                    after_step()
                continue
            images, labels = images.to(device), labels.to(device)  # no-ops on the CPU
            logits = model(images).reshape(-1)
            if ghost_loss is not None:
                loss = ghost_loss(logits, labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels)
            loss.backward()
            optimizer.step()
            if after_step:
                after_step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
    return total / max(count, 1)


def proximal_pull(model: nn.Module, global_weights: dict[str, torch.Tensor], lr: float, mu: float) -> Callable[[], None]:
    """FedProx's proximal term as a decoupled step w ← w − lr·μ·(w − w_global).

    It is applied after the optimizer step, not added to the loss: it does not depend on the
    data, so it needs no clipping or noise — and Opacus would drop a loss term that does not
    pass through the model's layers.
    """
    pairs = [(p, global_weights[name].to(p.device, p.dtype)) for name, p in _named_parameters(model)]

    @torch.no_grad()
    def pull() -> None:
        for p, anchor in pairs:
            p.sub_(lr * mu * (p - anchor))

    return pull


def _named_parameters(model: nn.Module):
    """Parameter names as in the plain model's state dict (Opacus wraps it in `_module`)."""
    inner = getattr(model, "_module", model)
    return inner.named_parameters()


def _set_empty_grads(model: nn.Module, ghost: bool) -> None:
    """What Opacus' optimizer reads when a Poisson batch is empty: no per-sample gradients
    (hooks) or a zero clipped gradient (ghost clipping); it then adds the noise."""
    for p in model.parameters():
        if p.requires_grad:
            if ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, records: ImageRecords, batch_size: int) -> np.ndarray:
    """Malignancy probabilities for every record (computed on the model's device)."""
    model.eval()
    device = _device_of(model)
    loader = DataLoader(RecordDataset(records, augment=False), batch_size=batch_size)
    scores = [torch.sigmoid(model(images.to(device)).reshape(-1)) for images, _ in loader]
    return torch.cat(scores).cpu().numpy() if scores else np.zeros(0)
