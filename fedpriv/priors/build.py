"""Compute (or fetch from the cache) a prior for the configured model: supervised on the
procedural phantom, or contrastive on images of random processes. Both draw their images
from a seed stream of their own, never from the run's records."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.data.phantom_ct import PhantomCTSpec, generate_phantom_ct
from fedpriv.errors import FedprivError
from fedpriv.models import build_model, takes_volumes
from fedpriv.priors.cache import cached
from fedpriv.priors.random_process import Projection, augment, nt_xent, random_process_images
from fedpriv.settings import ModelSettings, PriorSettings

log = logging.getLogger(__name__)

#: Mixed into the run's seed for the prior's own random stream (phantom images, augmentations,
#: initialization): a phantom prior never redraws the run's own phantom records.
PRIOR_STREAM = 0x5052494F


def prior_weights(prior: PriorSettings, model: ModelSettings, image_size: int) -> tuple[dict, dict] | None:
    """The prior's state dict for this model and a description of the public step (for the
    ledger); None under prior=none. The prior's seed is its own (`prior.seed`)."""
    if prior.name == "none":
        return None
    train, seed = PRIORS[prior.name], prior.seed
    shape = {"prior": prior.shape(), "model": [model.name, list(model.kwargs)], "image_size": image_size, "seed": seed}
    started = time.perf_counter()
    weights, key, reused = cached(prior.cache_dir, prior.name, shape, lambda: train(prior, model, image_size, seed))
    log.info("prior=%s %s in %.1f s (key %s)", prior.name, "read from the cache" if reused else "computed", time.perf_counter() - started, key)
    return weights, {"mechanism": "public-prior", "epsilon": 0.0, "source": f"prior={prior.name}", "cache_key": key}


def _start(prior: PriorSettings, model: ModelSettings, image_size: int, seed: int) -> tuple[nn.Module, np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, PRIOR_STREAM])
    torch.manual_seed(int(rng.integers(2**31)))
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    return build_model(model, image_size), rng, generator


def _optimizer(prior: PriorSettings, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum 0.9) or AdamW, with a one-cycle rate over the prior's steps."""
    params = list(params)
    if prior.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=prior.lr, momentum=0.9, weight_decay=prior.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=prior.lr, weight_decay=prior.weight_decay)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, prior.lr, total_steps=prior.steps)


def _flip_rotate(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random 90° rotation and flip in the last two axes, as local training augments."""
    turns = int(torch.randint(4, (), generator=generator))
    images = torch.rot90(images, turns, dims=(-2, -1))
    return images.flip(-1) if torch.rand((), generator=generator) < 0.5 else images


def train_phantom_prior(prior: PriorSettings, model_settings: ModelSettings, image_size: int, seed: int) -> dict:
    """Supervised malignancy training on phantom masses (2D) or lesions (volumes), as the model
    takes: `num_patients` phantom patients, `steps` SGD steps of `batch_size`."""
    model, rng, generator = _start(prior, model_settings, image_size, seed)
    phantom_seed = int(rng.integers(2**31))
    if takes_volumes(model):
        spec = PhantomCTSpec(prior.num_patients, image_size, 4, 0.45, prior.class_separation, 1.0)
        records = generate_phantom_ct(spec, phantom_seed)
    else:
        spec = PhantomSpec(prior.num_patients, 2, image_size, 4, 0.45, prior.class_separation, 1.0)
        records = generate_phantom_mammo(spec, phantom_seed)
    images, labels = torch.from_numpy(records.images), torch.from_numpy(records.labels).float()
    optimizer, schedule = _optimizer(prior, model.parameters())
    model.train()
    for step in range(prior.steps):
        rows = torch.randint(len(images), (prior.batch_size,), generator=generator)
        x = (_flip_rotate(images[rows], generator) - 0.5) / 0.5
        loss = F.binary_cross_entropy_with_logits(model(x).reshape(-1), labels[rows])
        _step(optimizer, schedule, loss, step, prior.steps)
    return model.state_dict()


def train_random_process_prior(prior: PriorSettings, model_settings: ModelSettings, image_size: int, seed: int) -> dict:
    """SimCLR on fresh random-process images every step; the projection head is dropped and
    the classifier head keeps its random initialization."""
    model, rng, generator = _start(prior, model_settings, image_size, seed)
    if takes_volumes(model) or not hasattr(model, "forward_head"):
        raise FedprivError(
            f"prior=random_process needs a 2D model with timm's forward_features/forward_head; "
            f"model.name={model_settings.name} does not have them: use prior=phantom or prior=none"
        )
    encode = lambda x: model.forward_head(model.forward_features((x - 0.5) / 0.5), pre_logits=True)  # noqa: E731
    with torch.no_grad():
        width = encode(torch.zeros(2, 1, image_size, image_size)).shape[1]
    projection = Projection(width)
    optimizer, schedule = _optimizer(prior, [*model.parameters(), *projection.parameters()])
    model.train()
    for step in range(prior.steps):
        images = torch.from_numpy(random_process_images(rng, prior.batch_size, image_size))
        z1, z2 = projection(encode(augment(images, generator))), projection(encode(augment(images, generator)))
        _step(optimizer, schedule, nt_xent(z1, z2, prior.temperature), step, prior.steps)
    return model.state_dict()


def _step(optimizer, schedule, loss: torch.Tensor, step: int, steps: int) -> None:
    value = loss.item()
    if not math.isfinite(value):
        raise FedprivError(f"the prior's loss became {value} at step {step}; lower prior.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    if (step + 1) % max(1, steps // 10) == 0:
        log.info("prior: step %d/%d, loss %.4f", step + 1, steps, value)


PRIORS: dict[str, Callable[[PriorSettings, ModelSettings, int, int], dict]] = {
    "phantom": train_phantom_prior,
    "random_process": train_random_process_prior,
}
