"""Every private or undocumented part of Flower, Opacus, timm and Ray that fedpriv relies on,
and the only module that reaches into them (Hydra is used through its public API alone).

`INTERNALS` lists each one: the library, the object, and what fedpriv needs of it; each
function below is the one place that uses it. tests/test_internals.py checks every entry
against the installed libraries, failing with the entry's name when an upgrade changes it,
and checks that no other module of fedpriv reaches into a library's private parts.

The libraries are imported inside the functions: importing this module never fails because
a private module moved (the test names it instead).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


@dataclass(frozen=True)
class Internal:
    """A library internal: its `library`, the object's dotted `path`, and what fedpriv `needs` of it."""

    library: str
    path: str
    needs: str


INTERNALS = (
    Internal(
        "flwr", "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue",
        "the simulation engine's message sweep (state, queue, nodes_mapping, f_stop), looked up by "
        "vce_api.run_api when the engine starts: swap_flower_message_queue replaces it for a run",
    ),
    Internal(
        "flwr", "flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend",
        "build(app_fn) creates `pool` (a BasicActorPool: idle actors in `pool.pool`, `num_actors`, "
        "terminate_all_actors()) and sets `app_fn`; terminate() ends the pool and ray.shutdown(); "
        "__init__ calls ray.init only when Ray is not initialized: keep_flower_actors",
    ),
    Internal(
        "flwr", "flwr.server.superlink.linkstate.in_memory_linkstate.InMemoryLinkState",
        "the simulation's LinkState: `message_ins_store` (id → Message, metadata.delivered_at '' until "
        "delivered) under `lock`, and get_message_ins(node_id=, limit=): nodes_with_undelivered_messages",
    ),
    Internal(
        "flwr", "flwr.serverapp.strategy.strategy_utils.sample_nodes",
        "strategies sample with Python's global random.sample over grid.get_node_ids() in their order: "
        "seed_flower_node_sampling",
    ),
    Internal(
        "flwr", "flwr.supercore.differential_privacy.add_gaussian_noise_inplace",
        "the server-side DP wrappers draw their noise (and the adaptive clipped count) from numpy's "
        "global RNG: seed_flower_dp_noise, flower_rng_state",
    ),
    Internal(
        "flwr", "flwr.serverapp.strategy.FedAdam",
        "server optimiser moments `m_t`, `v_t` (name → ndarray, None before the first aggregation) are "
        "all it carries between rounds (`current_arrays` is set by configure_train): strategy_state",
    ),
    Internal("flwr", "flwr.serverapp.strategy.FedYogi", "as FedAdam: `m_t`, `v_t`: strategy_state"),
    Internal(
        "flwr", "flwr.serverapp.strategy.FedAvgM",
        "the server momentum `momentum_vector` (a list of ndarrays, None before the first aggregation) and "
        "`current_arrays` (an ArrayRecord: the weights before the server-side DP noise, under client-level DP) "
        "are all it carries between rounds: strategy_state",
    ),
    Internal(
        "flwr", "flwr.serverapp.strategy.DifferentialPrivacyServerSideAdaptiveClipping",
        "`clipping_norm` (a float, updated every round) and the wrapped `strategy`: strategy_state",
    ),
    Internal(
        "flwr", "flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping",
        "the wrapped `strategy` (the wrapper itself carries nothing between rounds): strategy_state",
    ),
    Internal(
        "opacus", "opacus.optimizers.DPOptimizer.loss_reduction",
        "read by scale_grad at every step: 'mean' divides the noisy sum by expected_batch_size "
        "(per-sample gradients come from a summed loss): set_opacus_loss_reduction",
    ),
    Internal(
        "opacus", "opacus.optimizers.DPOptimizer.max_grad_norm",
        "read at every step, for clipping and for the noise's std: set_opacus_clip_norm",
    ),
    Internal(
        "opacus", "opacus.grad_sample.GradSampleModuleFastGradientClipping.max_grad_norm",
        "read by ghost clipping's per-sample clipping factors: set_opacus_clip_norm",
    ),
    Internal(
        "opacus", "opacus.grad_sample.GradSampleModule._module",
        "the wrapped model, whose state dict has the plain model's names: unwrap_opacus_module",
    ),
    Internal(
        "opacus", "opacus.optimizers.DPOptimizer (p.grad_sample)",
        "each parameter's per-sample gradients, a (B, *shape) tensor after a backward, are what the "
        "optimizer clips, whoever wrote them: average_grad_samples_over_views, set_empty_batch_gradients",
    ),
    Internal(
        "opacus", "opacus.optimizers.DPOptimizerFastGradientClipping (p.grad)",
        "under ghost clipping p.grad holds the clipped per-sample sum the optimizer noises: "
        "set_empty_batch_gradients",
    ),
    Internal(
        "opacus", "opacus.grad_sample.layer_norm.compute_layer_norm_grad_sample",
        "nn.LayerNorm's grad sampler (layer, activations, backprops), not exported; timm's LayerNorm is a "
        "subclass with the same maths: register_timm_layer_norm",
    ),
    Internal(
        "timm", "timm.models._hub.HF_SAFE_WEIGHTS_NAME",
        "with HF_WEIGHTS_NAME, the weight files timm reads from a Hugging Face hub repository, "
        "safetensors first: timm_hub_weight_files",
    ),
    Internal(
        "timm", "timm.create_model",
        "calls a registered entrypoint with pretrained, pretrained_cfg, pretrained_cfg_overlay and "
        "cache_dir besides the model's own arguments: without_timm_plumbing",
    ),
    Internal(
        "kymatio", "kymatio.scattering2d.frontend.torch_frontend.ScatteringTorch2D",
        "the 2D scattering transform's torch front end (J, shape, L; output (N, C, channels, h, w)), "
        "imported from its own module because kymatio.torch also imports the 3D front end, which "
        "needs scipy.special.sph_harm (gone in SciPy 1.17); its filters are module buffers: scattering_2d",
    ),
    Internal(
        "ray", "ray._private.utils.get_num_cpus",
        "the CPUs a local Ray instance counts (cgroup limits included), before ray.init: local_ray_cpus",
    ),
)


# --- Flower ---------------------------------------------------------------------------------


@contextlib.contextmanager
def swap_flower_message_queue() -> Iterator[None]:
    """Flower's simulation engine sweeps messages with `queue_pending_messages` while inside
    (for one run); Flower's own sweep is back afterwards, however the run ends."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_sweep = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = queue_pending_messages
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_sweep


#: The Ray actor pool a finished simulation left for the next one of the same sweep: {"key", "pool"}.
_KEPT_ACTORS: dict = {}


@contextlib.contextmanager
def keep_flower_actors(key: str) -> Iterator[None]:
    """While inside (one simulation), Flower's Ray backend takes the actor pool a previous
    simulation left under the same `key` (Ray and its worker processes already started, their
    imports and per-process caches warm) instead of starting new actors, and leaves its own
    pool and Ray running when it terminates. `release_flower_actors()` ends both."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    build, terminate = RayBackend.build, RayBackend.terminate

    def reuse_or_build(backend, app_fn) -> None:
        pool = _KEPT_ACTORS.get("pool")
        if _KEPT_ACTORS.get("key") == key and pool is not None and len(pool.pool) == pool.num_actors > 0:
            backend.pool, backend.app_fn = pool, app_fn  # every actor idle: the previous run ended cleanly
            return
        build(backend, app_fn)
        _KEPT_ACTORS.update(key=key, pool=backend.pool)

    RayBackend.build, RayBackend.terminate = reuse_or_build, lambda backend: None
    try:
        yield
    finally:
        RayBackend.build, RayBackend.terminate = build, terminate


def kept_flower_actors_key() -> str | None:
    """The key of the actor pool a previous simulation left running (None: none is)."""
    return _KEPT_ACTORS.get("key")


def release_flower_actors() -> None:
    """End the kept actor pool and the Ray instance it runs in (nothing when none is kept)."""
    import ray

    pool = _KEPT_ACTORS.pop("pool", None)
    _KEPT_ACTORS.pop("key", None)
    if pool is not None:
        pool.terminate_all_actors()
    if ray.is_initialized():
        ray.shutdown()


def queue_pending_messages(state, queue, nodes_mapping, f_stop) -> None:
    """Flower's `vce_api.add_messages_to_queue` (the simulation engine's thread that hands
    messages to the Ray workers), asking only the nodes that have an undelivered message.
    Flower asks every node every 0.1 s, and each question checks every stored message: with
    1000 hospitals one sweep held the driver's GIL for ~0.8 s (37 s of a 65 s run), slowing
    each round and the server's evaluation. Same order, same one message per node per sweep."""
    while not f_stop.is_set():
        for node_id in nodes_with_undelivered_messages(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(0.1)


def nodes_with_undelivered_messages(state, nodes_mapping) -> list[int]:
    """The nodes (in Flower's order) that an undelivered message in the in-memory LinkState
    is addressed to; every node for any other LinkState."""
    store = getattr(state, "message_ins_store", None)
    if store is None:
        return list(nodes_mapping)
    with state.lock:
        pending = {message.metadata.dst_node_id for message in store.values() if not message.metadata.delivered_at}
    return [node for node in nodes_mapping if node in pending]


def seed_flower_node_sampling(seed: int) -> None:
    """Flower's strategies sample nodes with Python's global `random`: seeding it makes the
    next sample depend on the seed (and the order the grid lists its nodes) alone."""
    random.seed(seed)


def seed_flower_dp_noise(seed: int) -> None:
    """Flower's server-side DP wrappers (privacy=central) draw their noise from numpy's global RNG."""
    np.random.seed(seed)


def flower_rng_state() -> dict:
    """The global RNG states Flower draws from (Python's: sampling; numpy's: DP noise) as
    tensors and numbers, which torch.load(weights_only=True) reads."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "numpy": {
            "name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_flower_rng_state(state: dict) -> None:
    """Set the global RNGs Flower draws from to a `flower_rng_state()`."""
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


#: What each strategy fedpriv configures carries from round to round (see INTERNALS).
_STRATEGY_STATE = {
    "FedAdam": ("m_t", "v_t"),
    "FedYogi": ("m_t", "v_t"),
    "FedAvgM": ("momentum_vector", "current_arrays"),
    "DifferentialPrivacyServerSideAdaptiveClipping": ("clipping_norm",),
    "DifferentialPrivacyServerSideFixedClipping": (),
}


#: Strategies that wrap another (its `.strategy`): fedpriv's and Flower's server-side DP wrappers.
_WRAPPERS = ("HospitalOrdered", "DifferentialPrivacyServerSideAdaptiveClipping", "DifferentialPrivacyServerSideFixedClipping")


def _strategies(strategy) -> list:
    """The strategy and every strategy it wraps."""
    parts = [strategy]
    while type(parts[-1]).__name__ in _WRAPPERS:
        parts.append(parts[-1].strategy)
    return parts


def strategy_state(strategy) -> dict:
    """Everything the Flower strategy carries from one round to the next (server optimiser
    moments, an adaptive clipping norm), as tensors and numbers: attribute name → value."""
    return {
        name: _plain(getattr(part, name))
        for part in _strategies(strategy)
        for name in _STRATEGY_STATE.get(type(part).__name__, ())
    }


def restore_strategy_state(strategy, state: dict) -> None:
    """Put a `strategy_state()` into a freshly built strategy of the same configuration."""
    for part in _strategies(strategy):
        for name in _STRATEGY_STATE.get(type(part).__name__, ()):
            setattr(part, name, _from_plain(state[name]))


#: The key under which a saved strategy state holds an ArrayRecord's arrays.
ARRAY_RECORD = "__array_record__"


def _plain(value):
    """numpy arrays (also in dicts and lists) as tensors, an ArrayRecord as {ARRAY_RECORD: its
    tensors}; numbers and None as they are."""
    if isinstance(value, ArrayRecord):
        return {ARRAY_RECORD: {k: torch.from_numpy(v.numpy().copy()) for k, v in value.items()}}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return torch.tensor(value) if isinstance(value, np.ndarray) else value


def _from_plain(value):
    if isinstance(value, dict) and set(value) == {ARRAY_RECORD}:
        return ArrayRecord({k: Array(v.numpy()) for k, v in value[ARRAY_RECORD].items()})
    if isinstance(value, dict):
        return {k: _from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_plain(v) for v in value]
    return value.numpy() if isinstance(value, torch.Tensor) else value


# --- Opacus ---------------------------------------------------------------------------------


def set_opacus_loss_reduction(optimizer: torch.optim.Optimizer, reduction: str) -> None:
    """How Opacus' optimizer scales the noisy gradient sum at each step ('mean': divided by
    the expected batch size), whatever it was made with."""
    optimizer.loss_reduction = reduction


def set_opacus_clip_norm(optimizer: torch.optim.Optimizer, model: nn.Module, max_grad_norm: float) -> None:
    """Clip to `max_grad_norm` from the next physical batch on; the noise of the next step is
    σ times it (ghost clipping reads the norm from the model)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    optimizer.max_grad_norm = max_grad_norm
    if isinstance(model, GradSampleModuleFastGradientClipping):
        model.max_grad_norm = max_grad_norm


def unwrap_opacus_module(model: nn.Module) -> nn.Module:
    """The plain model inside Opacus' wrapper (the model itself when it is not wrapped)."""
    from opacus.grad_sample import AbstractGradSampleModule

    return model._module if isinstance(model, AbstractGradSampleModule) else model


def average_grad_samples_over_views(model: nn.Module, views: int) -> None:
    """Opacus computed one per-sample gradient per view (of the loss already divided by
    `views`); summing each example's views gives its view-averaged gradient, which Opacus
    then clips as one sample: every example still contributes one clipped gradient."""
    for p in model.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is not None:
            p.grad_sample = grad_sample.reshape(-1, views, *grad_sample.shape[1:]).sum(1)


def set_empty_batch_gradients(model: nn.Module) -> None:
    """What Opacus' optimizer reads when a Poisson batch is empty: no per-sample gradients
    (hooks) or a zero clipped gradient (ghost clipping); it then adds the noise."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    ghost = isinstance(model, GradSampleModuleFastGradientClipping)
    for p in model.parameters():
        if p.requires_grad:
            if ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))


def register_timm_layer_norm() -> None:
    """Per-sample gradients for timm's LayerNorm: Opacus matches exact layer types, and timm's
    subclasses nn.LayerNorm with the same maths."""
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
    from timm.layers import LayerNorm

    register_grad_sampler(LayerNorm)(compute_layer_norm_grad_sample)


# --- timm and Ray ---------------------------------------------------------------------------


def timm_hub_weight_files() -> tuple[str, str]:
    """The weight files timm reads from a Hugging Face hub repository, in its order of preference."""
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    return HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME


#: What timm.create_model passes to a registered model's entrypoint besides `pretrained` and the model's own arguments.
TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def without_timm_plumbing(kwargs: dict) -> dict:
    """A registered entrypoint's arguments without timm's pretrained-config plumbing."""
    return {k: v for k, v in kwargs.items() if k not in TIMM_PLUMBING}


# --- kymatio -----------------------------------------------------------------------------------


def scattering_2d(scales: int, size: int, angles: int) -> nn.Module:
    """kymatio's 2D scattering transform of size×size images, its filters kept out of the state
    dict (fixed by the three numbers, they are rebuilt wherever the model is built)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    transform = ScatteringTorch2D(J=scales, shape=(size, size), L=angles)
    for name, buffer in list(transform.named_buffers(recurse=False)):
        transform.register_buffer(name, buffer, persistent=False)
    return transform


def local_ray_cpus() -> float:
    """The CPUs a local Ray instance would count (cgroup limits included); Ray has no public
    API for it before ray.init."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus()
