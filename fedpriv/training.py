"""Local training epochs and prediction, shared by private and non-private hospitals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpriv.data.records import ImageRecords
from fedpriv.head_inputs import classifier, head_inputs
from fedpriv.internals import average_grad_samples_over_views, set_empty_batch_gradients, unwrap_opacus_module
from fedpriv.settings import TrainingSettings


class RecordDataset(Dataset):
    """Torch view of ImageRecords (2D images or 3D volumes); `augment` applies random 90°
    rotations and flips in the last two axes (mass patches have no canonical orientation).
    `views` > 1 gives each example as a stack of that many independently augmented views."""

    def __init__(self, records: ImageRecords, augment: bool, views: int = 1) -> None:
        self.images = torch.from_numpy(records.images)
        self.labels = torch.from_numpy(records.labels.astype(np.float32))
        self.augment = augment
        self.views = views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.views == 1:
            return self._view(self.images[i]), self.labels[i]
        return torch.stack([self._view(self.images[i]) for _ in range(self.views)]), self.labels[i]

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        if self.augment:
            image = torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - 0.5) / 0.5


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
    sum_loss: bool,
    views: int = 1,
    ghost_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Run `epochs` passes on the model's device; return the mean per-example loss.

    `sum_loss` is for Opacus with loss_reduction="sum" (fedpriv.privacy.engine divides the
    noisy sum by the expected batch); otherwise the loss is the batch mean. Empty Poisson
    batches still take a (noisy) step. With `views` > 1 a batch is (B, views, …): the model
    sees B·views inputs and each example's loss (and, under DP, its gradient before
    clipping) is the mean over its views (augmentation multiplicity). `ghost_loss`: Opacus'
    ghost-clipping criterion (summed BCE), whose backward() clips per sample in two passes.
    """
    model.train()
    device = _device_of(model)
    total, count = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:  # Poisson sampled nobody: the DP step is noise only
                set_empty_batch_gradients(model)
                optimizer.step()
                continue
            images, labels = images.to(device), labels.to(device)  # no-ops on the CPU
            if views > 1:
                images, labels = images.flatten(0, 1), labels.repeat_interleave(views)
            logits = model(images).reshape(-1)
            if ghost_loss is not None:  # views == 1 (settings refuse ghost with augmentations)
                loss = ghost_loss(logits, labels)
                loss.backward()
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / views
                (loss if sum_loss else loss / (len(labels) // views)).backward()
            if views > 1:
                average_grad_samples_over_views(model, views)
            optimizer.step()
            total += float(loss.detach())
            count += len(labels) // views
    return total / max(count, 1)


def proximal_pull(model: nn.Module, global_weights: dict[str, torch.Tensor], mu: float) -> Callable:
    """FedProx's proximal term as a decoupled step w ← w − lr·μ·(w − w_global), an optimizer
    step post-hook (lr: the step's current learning rate).

    It is applied after the optimizer step, not added to the loss: it does not depend on the
    data, so it needs no clipping or noise — and Opacus would drop a loss term that does not
    pass through the model's layers. As a hook it runs on real steps only (not on the
    physical batches whose step Opacus skips).
    """
    pairs = [(p, global_weights[name].to(p.device, p.dtype)) for name, p in _named_parameters(model)]

    @torch.no_grad()
    def pull(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        lr = optimizer.param_groups[0]["lr"]
        for p, anchor in pairs:
            p.sub_(lr * mu * (p - anchor))

    return pull


def _named_parameters(model: nn.Module):
    """Parameter names as in the plain model's state dict (also of a model Opacus wrapped)."""
    return unwrap_opacus_module(model).named_parameters()


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations and flips of each image (of the last two axes: slices of a volume)."""
    rotations = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [view.flip(-1) for view in rotations]


@torch.no_grad()
def predict(model: nn.Module, records: ImageRecords, batch_size: int, tta: bool = False) -> np.ndarray:
    """Malignancy probabilities for every record (computed on the model's device); `tta`:
    from the mean logit over the image's 8 dihedral views."""
    model.eval()
    device = _device_of(model)
    inputs = None if tta else head_inputs(model, records.images, batch_size)
    if inputs is not None:  # the backbone's output, computed once per backbone (fedpriv.head_inputs)
        _, head = classifier(model)
        return torch.sigmoid(head(inputs).reshape(-1)).cpu().numpy()
    loader = DataLoader(RecordDataset(records, augment=False), batch_size=batch_size)

    def logits(images: torch.Tensor) -> torch.Tensor:
        views = dihedral_views(images) if tta else [images]
        return torch.stack([model(view).reshape(-1) for view in views]).mean(0)

    scores = [torch.sigmoid(logits(images.to(device))) for images, _ in loader]
    return torch.cat(scores).cpu().numpy() if scores else np.zeros(0)
