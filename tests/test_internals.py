"""Every library internal fedpriv.internals lists still has the shape fedpriv needs (each
check fails naming the internal), no other module of fedpriv reaches into a library's
private parts, and a Flower strategy rebuilt from its saved state continues exactly as the
one that ran. Internal paths are imported inside each check, so that a moved one fails that
check by name rather than this whole file."""

from __future__ import annotations

import ast
import inspect
import io
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from conftest import ROOT, TINY, make_settings
from fedpriv import internals
from fedpriv.internals import INTERNALS, restore_strategy_state, strategy_state
from fedpriv.experiment import run_strategy
from fedpriv.protocol import UNIFORM_WEIGHT

# --- the checks, one per listed internal ------------------------------------------------------


class Nodes:
    """Stands in for the simulation's grid: the node ids a strategy samples from."""

    def get_node_ids(self) -> list[int]:
        return [3, 1, 4, 2]


def _round(strategy, server_round: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One training round of a real Flower strategy; each sampled node replies with the
    weights moved by its own seeded noise (and a weight of 10 + its id)."""
    random.seed(server_round)
    replies = []
    for message in strategy.configure_train(server_round, ArrayRecord(weights), ConfigRecord({}), Nodes()):
        node = message.metadata.dst_node_id
        noise = torch.Generator().manual_seed(100 * server_round + node)
        moved = {k: v + 0.3 * torch.randn(v.shape, generator=noise) for k, v in weights.items()}
        metrics = MetricRecord({"num-examples": 10 + node, UNIFORM_WEIGHT: 1})
        replies.append(Message(RecordDict({"arrays": ArrayRecord(moved), "metrics": metrics}), reply_to=message))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict()


WEIGHTS = {"w": torch.linspace(-1, 1, 6).reshape(3, 2), "b": torch.tensor([0.5, -0.25])}

PRIVACY = {"none": ["privacy=none"], **{c: ["privacy=central", f"privacy.clipping={c}"] for c in ("fixed", "adaptive")}}
#: Settings that build each strategy fedpriv configures, and the class fedpriv.internals knows it by.
STRATEGY_SETTINGS = {
    "FedAdam": ["strategy=fedadam"],
    "FedYogi": ["strategy=fedyogi"],
    "FedAvgM": ["strategy=fedavgm"],
    "DifferentialPrivacyServerSideAdaptiveClipping": PRIVACY["adaptive"],
    "DifferentialPrivacyServerSideFixedClipping": PRIVACY["fixed"],
}


def _strategy(overrides: list[str]):
    return run_strategy(make_settings([*TINY, "num_clients=4", "strategy.clients_per_round=3", *overrides]))


def _differences(a, b, path: str) -> list[str]:
    """Where two strategies (or parts of them) differ, as attribute paths."""
    if type(a) is not type(b):
        return [path]
    if isinstance(a, Strategy):
        names = sorted(set(vars(a)) | set(vars(b)))
        return [d for n in names for d in _differences(vars(a).get(n), vars(b).get(n), f"{path}.{n}")]
    if isinstance(a, ArrayRecord):
        return _differences({k: v.numpy() for k, v in a.items()}, {k: v.numpy() for k, v in b.items()}, path)
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [path]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, np.ndarray):
        return [] if a.dtype == b.dtype and np.array_equal(a, b) else [path]
    if isinstance(a, list):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a is b or a == b else [path]


def _carries_only_its_listed_state(name: str):
    def check() -> None:
        used = _strategy(STRATEGY_SETTINGS[name])
        weights = WEIGHTS
        for server_round in (1, 2):
            weights = _round(used, server_round, weights)
        assert type(used).__name__ == name or type(used.strategy).__name__ == name
        restored = _strategy(STRATEGY_SETTINGS[name])
        restore_strategy_state(restored, strategy_state(used))
        for strategy in (used, restored):  # what configure_train sets each round, from the weights it is given
            strategy.configure_train(3, ArrayRecord(weights), ConfigRecord({}), Nodes())
        differing = _differences(used, restored, name)
        assert not differing, f"carried from round to round but not by strategy_state: {differing}"

    return check


def _message_sweep() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    assert list(inspect.signature(vce_api.add_messages_to_queue).parameters) == ["state", "queue", "nodes_mapping", "f_stop"]
    assert "add_messages_to_queue" in vce_api.run_api.__code__.co_names, "run_api no longer looks the sweep up in its module"
    with internals.swap_flower_message_queue():
        assert vce_api.add_messages_to_queue is internals.queue_pending_messages
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__


def _link_state() -> None:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())  # as run_simulation builds it
    assert isinstance(state.message_ins_store, dict)
    with state.lock:
        pass
    assert {"node_id", "limit"} <= set(inspect.signature(state.get_message_ins).parameters)
    assert Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY).metadata.delivered_at == ""


def _node_sampling() -> None:
    strategy = FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_train_nodes=2, min_evaluate_nodes=0, min_available_nodes=4)
    for seed in range(5):
        internals.seed_flower_node_sampling(seed)
        sampled = [m.metadata.dst_node_id for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), Nodes())]
        random.seed(seed)
        assert sampled == random.sample(Nodes().get_node_ids(), 2)


def _dp_noise() -> None:
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

    internals.seed_flower_dp_noise(5)
    noised = [np.zeros(4, dtype=np.float32)]
    add_gaussian_noise_inplace(noised, 1.0)
    np.random.seed(5)
    assert np.array_equal(noised[0], np.random.normal(0, 1.0, 4).astype(np.float32))
    for clipping in ("fixed", "adaptive"):  # both wrappers: the same seed, the same release; another seed, another
        releases = []
        for seed in (1, 1, 2):
            internals.seed_flower_dp_noise(seed)
            releases.append(_round(_strategy(PRIVACY[clipping]), 1, WEIGHTS)["w"])
        assert torch.equal(releases[0], releases[1]) and not torch.equal(releases[0], releases[2]), clipping


def _dp_optimizer(**kwargs):
    p = nn.Parameter(torch.zeros(2))
    settings = {"noise_multiplier": 0.0, "max_grad_norm": 1e6, "expected_batch_size": 1, "loss_reduction": "sum", **kwargs}
    return p, DPOptimizer(torch.optim.SGD([p], lr=1.0), **settings)


def _loss_reduction() -> None:
    p, optimizer = _dp_optimizer(expected_batch_size=4)
    internals.set_opacus_loss_reduction(optimizer, "mean")
    p.grad_sample = torch.tensor([[4.0, 8.0]])
    optimizer.step()
    assert torch.equal(p.detach(), torch.tensor([-1.0, -2.0])), "the noisy sum is not divided by expected_batch_size"


def _clip_norm() -> None:
    p, optimizer = _dp_optimizer()
    internals.set_opacus_clip_norm(optimizer, nn.Linear(1, 1), 1.0)
    p.grad_sample = torch.tensor([[3.0, 4.0]])  # norm 5
    optimizer.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]), atol=1e-5), "a changed max_grad_norm is not what clips"


def _ghost_clip_norm() -> None:
    model = GradSampleModuleFastGradientClipping(nn.Linear(2, 1), max_grad_norm=1.0)
    internals.set_opacus_clip_norm(_dp_optimizer()[1], model, 0.5)
    assert model.max_grad_norm == 0.5
    assert "max_grad_norm" in GradSampleModuleFastGradientClipping.get_clipping_coef.__code__.co_names


def _wrapped_module() -> None:
    plain = nn.Linear(2, 1)
    assert internals.unwrap_opacus_module(GradSampleModule(plain)) is plain
    assert internals.unwrap_opacus_module(plain) is plain


def _grad_sample() -> None:
    plain = nn.Linear(3, 1, bias=False)
    model, weight = GradSampleModule(plain, loss_reduction="sum"), plain.weight
    inputs = torch.arange(12.0).reshape(4, 3)  # 2 examples × 2 views
    model(inputs).sum().backward()
    assert weight.grad_sample.shape == (4, 1, 3)  # one per-sample gradient per input row
    internals.average_grad_samples_over_views(model, 2)
    assert torch.equal(weight.grad_sample, inputs.reshape(2, 2, 1, 3).sum(1))
    p, optimizer = _dp_optimizer()
    p.grad_sample = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # written, not computed: what the optimizer clips
    optimizer.step()
    assert torch.equal(p.detach(), torch.tensor([-4.0, -6.0]))
    optimizer.zero_grad()
    internals.set_empty_batch_gradients(nn.ParameterList([p]))
    optimizer.step()  # an empty batch: noise only (none here)
    assert torch.equal(p.detach(), torch.tensor([-4.0, -6.0]))


def _ghost_grad() -> None:
    plain = nn.Linear(2, 1, bias=False)
    model, weight = GradSampleModuleFastGradientClipping(plain, max_grad_norm=1.0), plain.weight
    start = weight.detach().clone()
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1, loss_reduction="sum"
    )
    weight.grad = torch.tensor([[1.0, -2.0]])  # the clipped per-sample sum, as ghost clipping's second pass leaves it
    optimizer.step()
    assert torch.equal(weight.detach(), start - torch.tensor([[1.0, -2.0]]))
    optimizer.zero_grad()
    internals.set_empty_batch_gradients(model)
    optimizer.step()
    assert torch.equal(weight.detach(), start - torch.tensor([[1.0, -2.0]]))


def _layer_norm() -> None:
    from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
    from timm.layers import LayerNorm

    assert list(inspect.signature(compute_layer_norm_grad_sample).parameters) == ["layer", "activations", "backprops"]
    assert issubclass(LayerNorm, nn.LayerNorm)
    internals.register_timm_layer_norm()
    torch.manual_seed(0)
    norm = LayerNorm(4)
    nn.init.normal_(norm.weight)
    inputs, target = torch.randn(3, 4), torch.randn(3, 4)
    model = GradSampleModule(norm, loss_reduction="sum")
    (model(inputs) * target).sum().backward()
    for i in range(3):  # each example's own gradient, by autograd
        loss = (nn.functional.layer_norm(inputs[i:i + 1], (4,), norm.weight, norm.bias, norm.eps) * target[i]).sum()
        single = torch.autograd.grad(loss, norm.weight)[0]
        assert torch.allclose(norm.weight.grad_sample[i], single, atol=1e-6)


def _hub_files() -> None:
    safetensors, pickled = internals.timm_hub_weight_files()
    assert safetensors.endswith(".safetensors") and pickled.endswith(".bin")


def _timm_plumbing() -> None:
    import timm

    import fedpriv.models  # noqa: F401  (registers fedpriv's models; their classes take no plumbing)

    assert set(internals.TIMM_PLUMBING) <= set(inspect.signature(timm.create_model).parameters)
    for name in ("fedpriv_cnn_small", "fedpriv_vit_hybrid_tiny"):
        timm.create_model(name, num_classes=1, in_chans=1)  # a TypeError names an argument timm added


def _scattering() -> None:
    transform = internals.scattering_2d(2, 16, 4)
    out = transform(torch.rand(3, 1, 16, 16))
    assert out.shape == (3, 1, 1 + 2 * 4 + 4 * 4, 4, 4)
    assert transform.state_dict() == {} and len(list(transform.buffers())) > 0  # filters rebuilt, not saved


def _ray_backend() -> None:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    assert list(inspect.signature(RayBackend.build).parameters) == ["self", "app_fn"]
    build = inspect.getsource(RayBackend.build)
    assert "self.pool = BasicActorPool(" in build and "self.app_fn = app_fn" in build
    assert "terminate_all_actors" in inspect.getsource(RayBackend.terminate)
    assert "if not ray.is_initialized()" in inspect.getsource(RayBackend.init_ray)
    assert "self.init_ray(" in inspect.getsource(RayBackend.__init__)
    pool = inspect.getsource(BasicActorPool.__init__)
    assert "self.pool: list" in pool and "self.num_actors = 0" in pool and callable(BasicActorPool.terminate_all_actors)


def _ray_cpus() -> None:
    assert internals.local_ray_cpus() >= 1


CHECKS = {
    "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue": _message_sweep,
    "flwr.server.superlink.linkstate.in_memory_linkstate.InMemoryLinkState": _link_state,
    "flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend": _ray_backend,
    "flwr.serverapp.strategy.strategy_utils.sample_nodes": _node_sampling,
    "flwr.supercore.differential_privacy.add_gaussian_noise_inplace": _dp_noise,
    **{f"flwr.serverapp.strategy.{name}": _carries_only_its_listed_state(name) for name in STRATEGY_SETTINGS},
    "opacus.optimizers.DPOptimizer.loss_reduction": _loss_reduction,
    "opacus.optimizers.DPOptimizer.max_grad_norm": _clip_norm,
    "opacus.grad_sample.GradSampleModuleFastGradientClipping.max_grad_norm": _ghost_clip_norm,
    "opacus.grad_sample.GradSampleModule._module": _wrapped_module,
    "opacus.optimizers.DPOptimizer (p.grad_sample)": _grad_sample,
    "opacus.optimizers.DPOptimizerFastGradientClipping (p.grad)": _ghost_grad,
    "opacus.grad_sample.layer_norm.compute_layer_norm_grad_sample": _layer_norm,
    "timm.models._hub.HF_SAFE_WEIGHTS_NAME": _hub_files,
    "timm.create_model": _timm_plumbing,
    "kymatio.scattering2d.frontend.torch_frontend.ScatteringTorch2D": _scattering,
    "ray._private.utils.get_num_cpus": _ray_cpus,
}


def test_every_listed_internal_has_a_check():
    assert sorted(CHECKS) == sorted(i.path for i in INTERNALS)


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.path)
def test_a_library_internal_still_has_the_shape_fedpriv_needs(internal, flower_task):
    try:
        CHECKS[internal.path]()
    except Exception as error:  # an AssertionError, or whatever the changed library raised
        pytest.fail(
            f"{internal.library} internal {internal.path} changed ({type(error).__name__}: {error}); "
            f"fedpriv needs: {internal.needs}. Update fedpriv/internals.py",
            pytrace=False,
        )


# --- nothing else reaches into a library's private parts ---------------------------------------

#: The library modules fedpriv imports from outside fedpriv.internals: their documented public API.
PUBLIC_MODULES = {
    "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation", "flwr.common.logger",
    "flwr_datasets.partitioner",
    "opacus", "opacus.accountants", "opacus.accountants.analysis.rdp", "opacus.grad_sample", "opacus.utils.batch_memory_manager",
    "opacus.validators",
    "timm", "timm.models", "timm.models.vision_transformer",
    "ray",
    "hydra", "hydra.core.hydra_config", "hydra.errors",
}
LIBRARIES = {"flwr", "flwr_datasets", "opacus", "timm", "ray", "hydra"}
#: Library attributes fedpriv.internals writes (anywhere else they would be written behind its back).
WRITTEN = {"add_messages_to_queue", "loss_reduction", "max_grad_norm", "grad_sample", "m_t", "v_t", "clipping_norm"}
#: Global RNGs whose seeding steers what Flower draws.
GLOBAL_RNG = {"random.seed", "random.setstate", "np.random.seed", "np.random.set_state", "numpy.random.seed", "numpy.random.set_state"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def reaches(source: str) -> list[tuple[int, str]]:
    """(line, what) for every reach into a library's private or undocumented parts in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if module.split(".")[0] in ("fedpriv", "__future__") or getattr(node, "level", 0):
                    continue
                if any(_private(part) for part in [*module.split("."), *names]):
                    found.append((node.lineno, f"imports a private name from {module}"))
                elif module.split(".")[0] in LIBRARIES and module not in PUBLIC_MODULES:
                    found.append((node.lineno, f"imports from {module}, not a public module"))
        elif isinstance(node, ast.Attribute):
            if _private(node.attr) and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, f"reads or writes {_dotted(node)}"))
            elif node.attr in WRITTEN and isinstance(node.ctx, (ast.Store, ast.Del)):
                found.append((node.lineno, f"writes {_dotted(node)}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            literal = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
            if name in ("getattr", "setattr", "hasattr", "delattr") and literal is not None and isinstance(literal.value, str):
                if _private(literal.value) or (name == "setattr" and literal.value in WRITTEN):
                    found.append((node.lineno, f"{name}(…, {literal.value!r})"))
            elif name in GLOBAL_RNG:
                found.append((node.lineno, f"calls {name} (steering a library's draws)"))
    return found


def test_nothing_outside_internals_reaches_into_a_library():
    sources = sorted((ROOT / "fedpriv").rglob("*.py"))
    sources.remove(ROOT / "fedpriv" / "internals.py")
    assert len(sources) > 40
    found = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in sources for line, what in reaches(path.read_text())]
    assert not found, "reaches into library internals outside fedpriv/internals.py (add a function there):\n" + "\n".join(found)


def test_the_reach_check_finds_each_kind_of_reach():
    source = """
from ray._private.utils import get_num_cpus
from flwr.server.superlink.fleet.vce import vce_api
from torch.nn.modules.batchnorm import _BatchNorm
vce_api.add_messages_to_queue = sweep
optimizer.loss_reduction = "mean"
session.model._module.state_dict()
getattr(model, "_module", model)
random.seed(3)
np.random.seed(3)
self._cache = self._build()
"""
    assert sorted(line for line, _ in reaches(source)) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


# --- a strategy rebuilt from its saved state ---------------------------------------------------


@pytest.mark.parametrize("privacy", list(PRIVACY.values()), ids=list(PRIVACY))
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"])
def test_a_rebuilt_strategy_continues_exactly_as_the_one_that_ran(name, privacy, flower_task):
    overrides = [f"strategy={name}", *privacy]
    used, weights = _strategy(overrides), WEIGHTS
    for server_round in (1, 2):
        weights = _round(used, server_round, weights)
    saved = io.BytesIO()
    torch.save(strategy_state(used), saved)
    saved.seek(0)
    rebuilt, fresh = _strategy(overrides), _strategy(overrides)
    restore_strategy_state(rebuilt, torch.load(saved, weights_only=True))  # plain data: no Flower object
    after = []
    for strategy in (used, rebuilt, fresh):
        np.random.seed(7)  # the central noise
        after.append(_round(strategy, 3, weights))
    assert all(torch.equal(after[0][k], after[1][k]) for k in weights)  # bit for bit
    stateful = name in ("fedadam", "fedyogi", "fedavgm") or "privacy.clipping=adaptive" in privacy
    assert stateful == (not all(torch.equal(after[0][k], after[2][k]) for k in weights))  # the state matters where there is one
