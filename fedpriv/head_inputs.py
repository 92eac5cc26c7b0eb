"""What a model's classifier head reads of each record, computed once per backbone.

With training.freeze=backbone only the head (timm's `get_classifier`) trains, so what it
reads of a record — the backbone's output — is the same at every step of every round as
long as the records are not augmented and the backbone has no random layers. Training the
head on those inputs, computed once, is the same computation as training the whole model
with its backbone frozen: the same Poisson batches, the same per-sample gradients of the
head, clipped and noised alike, the same ε. Prediction reads them too, so the server's
per-round validation costs one backbone pass per backbone, not one per round.

The inputs are kept per (backbone, records): the key is a digest of every tensor of the
model outside the head and of the records' pixels, so a changed backbone (a later round
that fine-tunes it, another prior, another hospital) can never reuse stale inputs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: (backbone digest, records digest) → the head's inputs; a few per process.
_CACHE: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_CACHE_SIZE = 16


def classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The head as (its name in the model, the module), when it is one linear layer the
    model ends with; None otherwise (such a model is trained and scored whole)."""
    if not hasattr(model, "get_classifier"):
        return None
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        return None
    return next((name for name, module in model.named_modules() if module is head), ""), head


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def has_random_layers(model: nn.Module) -> bool:
    """Dropout or drop-path with a non-zero rate: the backbone's output then varies by step."""
    return any(
        (isinstance(m, DROPOUTS) and m.p > 0) or float(getattr(m, "drop_prob", 0) or 0) > 0
        for m in model.modules()
    )


def backbone_digest(model: nn.Module, head_name: str) -> str:
    """A digest of every tensor of the model's state outside its head."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if head_name and name.startswith(f"{head_name}."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def records_digest(images: np.ndarray) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(images).tobytes(), digest_size=16)
    digest.update(str(images.shape).encode())
    return digest.hexdigest()


@torch.no_grad()
def head_inputs(model: nn.Module, images: np.ndarray, batch_size: int) -> torch.Tensor | None:
    """The head's input for every image (N×C×H×W in [0, 1], normalized as for training), on
    the model's device; None when the model does not end with its linear head or has random
    layers. Cached per (backbone, images)."""
    found = classifier(model)
    if found is None or has_random_layers(model):
        return None
    head_name, head = found
    key = (backbone_digest(model, head_name), records_digest(images))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            batch = (torch.from_numpy(images[start : start + batch_size]).to(device) - 0.5) / 0.5
            logits = model(batch)
            if len(captured) != start // batch_size + 1 or not torch.allclose(
                logits.reshape(-1), F.linear(captured[-1], head.weight, head.bias).reshape(-1), rtol=1e-4, atol=1e-5
            ):
                return None  # the head ran more than once, or something follows it
    finally:
        hook.remove()
        model.train(was_training)
    inputs = torch.cat(captured) if captured else torch.zeros(0, head.in_features, device=device)
    _CACHE[key] = inputs
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return inputs
