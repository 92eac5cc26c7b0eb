"""Where a hospital trains and the server evaluates: CUDA when the run asks for GPUs
(`backend.client_resources.num_gpus` > 0) and this process sees one, else the CPU.

Ray gives each hospital its share of a GPU through CUDA_VISIBLE_DEVICES, so "cuda" is the
device Ray assigned. On the CPU nothing moves: results stay bit-identical.
"""

from __future__ import annotations

import logging

import torch

from fedpriv.settings import BackendSettings

log = logging.getLogger(__name__)


def choose_device(num_gpus: float, cuda_available: bool) -> torch.device:
    """CUDA only when GPUs were asked for and one is visible; the CPU otherwise."""
    return torch.device("cuda") if num_gpus > 0 and cuda_available else torch.device("cpu")


def backend_device(backend: BackendSettings) -> torch.device:
    """The device for this process under `backend.client_resources` (a hospital's worker,
    or the driver evaluating the global model)."""
    num_gpus = float(dict(backend.client_resources).get("num_gpus", 0.0) or 0.0)
    device = choose_device(num_gpus, torch.cuda.is_available())
    if num_gpus > 0 and device.type == "cpu":
        log.warning("backend.client_resources.num_gpus=%g but this process sees no CUDA device; using the CPU", num_gpus)
    return device
