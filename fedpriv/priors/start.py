"""The run's starting weights, fixed before round 1 and touching no private record: a random
initialization, a prior (fedpriv.priors), a weights file (`model.init`) or timm's pretrained
weights (`model.pretrained`). Each non-random start is a public step of the ledger (ε = 0)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg
from torch import nn

from fedpriv.errors import FedprivError
from fedpriv.internals import timm_hub_weight_files
from fedpriv.models import build_model, classifier_parameters
from fedpriv.priors.build import prior_weights
from fedpriv.settings import ModelSettings, PriorSettings

log = logging.getLogger(__name__)

#: Buffers of a BatchNorm that has no place in the GroupNorm Opacus puts in its stead.
_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def starting_weights(model: ModelSettings, prior: PriorSettings, image_size: int, seed: int) -> tuple[dict, list[dict]]:
    """The global model's weights before round 1 and the public steps that made them."""
    weights, steps = _starting_weights(model, prior, image_size, seed)
    return {k: v.clone() for k, v in weights.items()}, [dict(step) for step in steps]


@functools.lru_cache(maxsize=2)
def _starting_weights(model: ModelSettings, prior: PriorSettings, image_size: int, seed: int) -> tuple[dict, tuple]:
    torch.manual_seed(seed)
    if model.pretrained:
        return _pretrained(model, image_size), ({"mechanism": "public-pretrained", "epsilon": 0.0, "source": f"timm:{model.name}"},)
    network = build_model(model, image_size)
    if model.init is not None:
        load_initial_weights(network, Path(model.init).expanduser())
        return network.state_dict(), ({"mechanism": "public-weights", "epsilon": 0.0, "source": model.init},)
    learned = prior_weights(prior, model, image_size)
    if learned is None:
        return network.state_dict(), ()
    weights, step = learned
    network.load_state_dict(weights)
    return network.state_dict(), (step,)


def _pretrained(model: ModelSettings, image_size: int) -> dict:
    """timm's weights for the model, read from a local file only: nothing downloads at run time."""
    local = _local_pretrained_file(model)
    kwargs = {k: v for k, v in model.kwargs if k != "pretrained_cfg_overlay"}
    overlay = {**dict(dict(model.kwargs).get("pretrained_cfg_overlay") or ()), "file": local}
    given = dataclasses.replace(model, kwargs=(*sorted(kwargs.items()), ("pretrained_cfg_overlay", overlay)))
    return build_model(given, image_size, pretrained=True).state_dict()


def _local_pretrained_file(model: ModelSettings) -> str:
    """Where timm's pretrained weights for the model lie on this machine: a file given in
    model.kwargs.pretrained_cfg_overlay, the Hugging Face hub cache, or torch.hub's cache."""
    overlay = dict(dict(model.kwargs).get("pretrained_cfg_overlay") or ())
    if overlay.get("file"):
        if not Path(overlay["file"]).expanduser().is_file():
            raise FedprivError(f"model.kwargs.pretrained_cfg_overlay.file={overlay['file']}: no such file")
        return str(Path(overlay["file"]).expanduser())
    cfg = get_pretrained_cfg(model.name)
    if cfg is None:
        raise FedprivError(f"model.pretrained=true: timm has no pretrained weights for model.name={model.name}")
    candidates = []
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        candidates += [try_to_load_from_cache(repo, name) for name in timm_hub_weight_files()]
    if cfg.url:
        candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path)))
    for candidate in candidates:
        if isinstance(candidate, str) and os.path.isfile(candidate):
            return candidate
    raise FedprivError(
        f"model.pretrained=true: no local copy of timm's weights for model.name={model.name} "
        f"({cfg.hf_hub_id or cfg.url}); nothing downloads at run time — fetch them once where the hub is "
        "reachable (timm.create_model(NAME, pretrained=True)), or pass a weights file with model.init=PATH"
    )


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (a state dict, or a checkpoint
    holding one under `state_dict` / `model`)."""
    if not path.is_file():
        raise FedprivError(f"model.init={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: say which
        raise FedprivError(f"model.init={path} is not a readable weights file ({type(error).__name__}: {str(error)[:120]})") from None
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise FedprivError(f"model.init={path} holds no state dict (a mapping of names to tensors)")
    return payload


def load_initial_weights(network: nn.Module, path: Path) -> None:
    """Load `path` into the model. The classifier head is kept fresh when its shape differs
    (e.g. ImageNet's 1000 classes); BatchNorm running statistics are dropped where Opacus put
    a GroupNorm; any other missing, extra or mis-shaped key is an error naming each one."""
    given = read_weights_file(path)
    own = network.state_dict()
    head = classifier_parameters(network)
    norms = {name for name, m in network.named_modules() if isinstance(m, nn.GroupNorm)}
    problems, loaded = [], {}
    for key, tensor in given.items():
        owner, _, leaf = key.rpartition(".")
        if key not in own:
            if not (leaf in _BATCHNORM_BUFFERS and owner in norms):
                problems.append(f"{key}: not in model.name's state dict")
        elif own[key].shape != tensor.shape:
            if key in head:
                log.info("model.init: classifier %s %s kept fresh (file has %s)", key, tuple(own[key].shape), tuple(tensor.shape))
            else:
                problems.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
        else:
            loaded[key] = tensor
    problems += [f"{key}: missing from the file" for key in own if key not in given and key not in head]
    if problems:
        listed = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        raise FedprivError(f"model.init={path} does not fit the model: {listed}")
    network.load_state_dict(loaded, strict=False)
