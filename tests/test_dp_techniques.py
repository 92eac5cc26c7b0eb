"""DP-training techniques (issue #6): augmentation multiplicity, LR and clipping-norm schedules, physical
batches, the EMA of the global model and external test folders — each asserted on what it
does, with the privacy accounting unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CBIS_CLASSES, TINY, make_settings, write_cbis_like, write_class_folder
from fedpriv.client import HospitalTrainer, hospital_shard
from fedpriv.data.sources import load_splits
from fedpriv.ema import update_average
from fedpriv.errors import FedprivError
from fedpriv.federation import RoundOutcome
from fedpriv.outputs import RunDirectory
from fedpriv.privacy.engine import PrivateSession, make_private
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.schedule import StepPlan, follow_clip_schedule, follow_lr_schedule, geometric_clip_norm
from fedpriv import server
from fedpriv.checkpoint import Checkpoint
from fedpriv.server import evaluate, initial_weights, run_rounds
from fedpriv.training import RecordDataset, train_epochs


def _close(a: dict, b: dict, **tolerance) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), **tolerance) for k in a)


def test_a_dp_step_with_no_noise_or_clipping_is_the_non_private_mean_step():
    """The noisy sum is divided by the expected batch: one learning rate for DP and non-DP."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4, 1, 2, 2), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    plain, private = (nn.Sequential(nn.Flatten(), nn.Linear(4, 1)) for _ in range(2))
    private.load_state_dict(plain.state_dict())
    train_epochs(plain, torch.optim.SGD(plain.parameters(), lr=0.5), DataLoader(data, batch_size=4), 1, False)
    loader = DataLoader(data, batch_size=4)  # q = 1: every example in the one batch
    session = make_private(private, torch.optim.SGD(private.parameters(), lr=0.5), loader, 0.0, 1e6, [], torch.Generator())
    train_epochs(session.model, session.optimizer, session.loader, 1, True)
    assert _close(plain.state_dict(), session.unwrapped_state(), atol=1e-6)


# --- augmentation multiplicity -------------------------------------------------------------


def test_views_are_averaged_before_clipping_so_each_example_is_one_clipped_gradient():
    """One example, two views, σ = 0, q = 1: the step is −lr·clip(mean of the views' gradients)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    views = torch.tensor([[[3.0, 0.0, 0.0, 1.0]], [[0.0, -2.0, 0.5, 0.0]]]).reshape(1, 2, 1, 2, 2)
    label = torch.ones(1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    clip = 0.1

    def grad_of(view):
        probe = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
        probe.load_state_dict(start)
        F.binary_cross_entropy_with_logits(probe(view).reshape(-1), label).backward()
        return torch.cat([p.grad.reshape(-1) for p in probe.parameters()])

    g = [grad_of(views[0, k : k + 1]) for k in range(2)]
    mean = (g[0] + g[1]) / 2
    expected = -mean * min(1.0, clip / float(mean.norm()))
    per_view_clipped = -sum(x * min(1.0, clip / float(x.norm())) for x in g) / 2  # what K=1-style clipping gives
    assert not torch.allclose(expected, per_view_clipped, atol=1e-4)

    loader = DataLoader(TensorDataset(views, label), batch_size=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    session = make_private(model, optimizer, loader, 0.0, clip, [], torch.Generator().manual_seed(0))
    train_epochs(session.model, session.optimizer, session.loader, 1, True, views=2)
    step = torch.cat([(v - start[k]).reshape(-1) for k, v in session.unwrapped_state().items()])
    assert torch.allclose(step, expected, atol=1e-6)


def test_augmentation_multiplicity_costs_the_same_privacy(tmp_path):
    settings = {k: make_settings([*TINY, "data.augment=true", f"training.augmentations={k}"]) for k in (1, 4)}
    reports = {}
    for k, s in settings.items():
        start = initial_weights(s)
        weights, reports[k] = HospitalTrainer(s, str(tmp_path / str(k)))(0, start, {"server-round": 1})
        assert not _close(weights, start)  # it trained
    for key in ("noise_multiplier", "sample_rate", "steps", "epsilon"):
        assert reports[1][key] == reports[4][key], key


def test_augmentations_need_augmented_views():
    with pytest.raises(FedprivError, match="training.augmentations"):
        make_settings([*TINY, "training.augmentations=4", "data.augment=false"])
    with pytest.raises(FedprivError, match="training.augmentations"):
        make_settings([*TINY, "training.augmentations=0"])


# --- learning-rate schedule ----------------------------------------------------------------


def test_cosine_schedule_runs_over_the_planned_steps_of_the_whole_run(tmp_path):
    s = make_settings([*TINY, "privacy=none", "training.lr_schedule=cosine", "training.lr=0.1"])
    trainer, per_round = HospitalTrainer(s, str(tmp_path)), 4  # e.g. 30 examples, batch 8
    seen = []
    for server_round in (1, 2):
        model = torch.nn.Linear(1, 1)
        optimizer = trainer._optimizer(model, model.state_dict(), StepPlan.of_round(server_round, s.rounds, per_round), 0.0)
        optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
        for _ in range(4):
            optimizer.step()
    total = s.rounds * 4
    assert seen == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)])
    assert seen[0] == pytest.approx(0.1) and seen[4] == pytest.approx(0.05)


def test_constant_schedule_keeps_the_learning_rate():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.3)
    follow_lr_schedule(optimizer, "constant", 0.3, StepPlan(5, 10))
    for _ in range(3):
        optimizer.step()
        assert optimizer.param_groups[0]["lr"] == 0.3
    with pytest.raises(FedprivError, match="training.lr_schedule"):
        make_settings([*TINY, "training.lr_schedule=linear"])


# --- clipping-norm schedule ----------------------------------------------------------------


def test_geometric_clip_norm_runs_from_the_first_to_the_final_norm():
    norms = [geometric_clip_norm(2.0, 0.5, t, 4) for t in range(6)]
    assert norms[0] == 2.0 and norms[4] == pytest.approx(0.5) and norms[5] == pytest.approx(0.5)
    assert norms[2] == pytest.approx(1.0)  # geometric: the middle is the geometric mean
    assert all(a > b for a, b in zip(norms[:4], norms[1:5]))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_each_step_clips_to_its_scheduled_norm_and_the_mechanism_is_unchanged(mode):
    """One example whose gradient (norm 10) is always clipped, q = 1, σ = 0: every step moves
    the weights by exactly lr × that step's clipping norm — the one its noise is scaled by."""
    data, lr = TensorDataset(torch.full((1, 1, 2, 2), 10.0), torch.ones(1)), 1e-3
    plan, histories = StepPlan(first_step=2, total_steps=6), {}
    for scheduled in (True, False):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
        nn.init.zeros_(model[1].weight)  # logit 0: the gradient stays far above every norm
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        session = make_private(model, optimizer, DataLoader(data, batch_size=1), 0.0, 2.0, [], torch.Generator(), mode)
        if scheduled:
            follow_clip_schedule(optimizer, session.set_clip_norm, 2.0, 0.5, plan)
        moves, before = [], session.unwrapped_state()["1.weight"].clone()
        for _ in range(3):
            train_epochs(session.model, session.optimizer, session.loader, 1, True, ghost_loss=session.ghost_loss)
            after = session.unwrapped_state()["1.weight"].clone()
            moves.append(float((after - before).norm()) / lr)
            before = after
        expected = [geometric_clip_norm(2.0, 0.5, t, 6) for t in (2, 3, 4)] if scheduled else [2.0] * 3
        assert moves == pytest.approx(expected, rel=1e-4)
        histories[scheduled] = session.history
    assert histories[True] == histories[False]  # same σ, q and steps: the same ε


def test_a_hospital_continues_the_clip_schedule_from_its_round(tmp_path, monkeypatch):
    s = make_settings([*TINY, "privacy.max_grad_norm=2.0", "privacy.final_max_grad_norm=0.5"])
    norms = []
    monkeypatch.setattr(PrivateSession, "set_clip_norm", lambda self, c: norms.append(c))
    trainer = HospitalTrainer(s, str(tmp_path))
    shard = len(hospital_shard(s, 0))
    per_round = math.ceil(shard / s.training.batch_size)
    weights = initial_weights(s)
    trainer(0, weights, {"server-round": 1})
    trainer(0, weights, {"server-round": 2})
    total = s.rounds * per_round
    assert norms[0] == 2.0 and norms[per_round + 1] == pytest.approx(geometric_clip_norm(2.0, 0.5, per_round, total))
    assert len(norms) == 2 * (per_round + 1)  # the round's first norm, then one per step


def test_clip_schedule_needs_a_positive_final_norm():
    with pytest.raises(FedprivError, match="privacy.final_max_grad_norm"):
        make_settings([*TINY, "privacy.final_max_grad_norm=0"])


# --- physical batches (BatchMemoryManager) -------------------------------------------------


def test_physical_batches_are_bounded_and_change_neither_steps_nor_result(tmp_path):
    settings = {m: make_settings([*TINY, "training.batch_size=20", f"training.max_physical_batch_size={m}"]) for m in ("null", 3)}
    results = {}
    for m, s in settings.items():
        start = initial_weights(s)
        results[m] = HospitalTrainer(s, str(tmp_path / str(m)))(0, start, {"server-round": 1})
    (plain, a), (split, b) = results["null"], results[3]
    for key in ("noise_multiplier", "sample_rate", "steps", "epsilon"):
        assert a[key] == b[key], key
    assert _close(plain, split, atol=1e-5)  # same Poisson batches, same noise: one logical step each

    s = settings[3]
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 1))
    shard = hospital_shard(s, 0)
    loader = DataLoader(RecordDataset(shard, True), batch_size=20)
    optimizer, steps = torch.optim.SGD(model.parameters(), lr=0.1), []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))  # what LR schedules and FedProx hook into
    session = make_private(model, optimizer, loader, 1.0, 1.0, [], torch.Generator().manual_seed(0))
    sizes = []
    session.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    with session.physical_batches(3) as batches:
        train_epochs(session.model, session.optimizer, batches, 1, True)
    assert sizes and max(sizes) <= 3 and sum(sizes) > 3
    assert sum(n for *_, n in session.history) == len(loader) == len(steps)  # logical steps, as planned


def test_physical_batches_need_local_dp():
    with pytest.raises(FedprivError, match="training.max_physical_batch_size"):
        make_settings([*TINY, "privacy=none", "training.max_physical_batch_size=4"])
    with pytest.raises(FedprivError, match="training.max_physical_batch_size"):
        make_settings([*TINY, "training.max_physical_batch_size=0"])


# --- EMA of the global model ---------------------------------------------------------------


class _ScriptedFederation:
    """Stands in for the Flower federation: round r releases weights filled with r."""

    strategy = None

    def __init__(self, template: dict) -> None:
        self.template = template

    def describe_hospitals(self, hospitals=None) -> dict:
        return {0: {"num_examples": 1}}

    def train_round(self, server_round, weights, config) -> RoundOutcome:
        released = {k: torch.full_like(v, float(server_round)) for k, v in self.template.items()}
        return RoundOutcome(trained={0: {"train_loss": 0.0, "num-examples": 1, "seconds": 0.0}}, weights=released)


def test_ema_model_is_the_exponential_average_of_the_round_weights(tmp_path):
    s = make_settings([*TINY, "privacy=none", "num_clients=1", "rounds=3", "evaluation.ema=0.5"])
    run = RunDirectory(tmp_path)
    lines, final, _ = run_rounds(
        _ScriptedFederation(initial_weights(s)), s, load_splits(s.data, s.seed), run, PrivacyLedger(delta=0.0), lambda line: None
    )
    expected = 0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 3  # ema_1 = w_1, ema_r = d·ema_{r−1} + (1 − d)·w_r
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in final.values())
    assert _close(torch.load(tmp_path / "model.pt"), final)  # the saved model is the average
    assert len(lines) == 3
    with pytest.raises(FedprivError, match="evaluation.ema"):
        make_settings([*TINY, "evaluation.ema=1.0"])


class _RandomModelsFederation(_ScriptedFederation):
    """Round r releases a freshly initialised model (seed r): validation AUROC differs by round."""

    def train_round(self, server_round, weights, config) -> RoundOutcome:
        torch.manual_seed(server_round)
        released = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in self.template.items()}
        return RoundOutcome(trained={0: {"train_loss": 0.0, "num-examples": 1, "seconds": 0.0}}, weights=released)


def test_best_val_selection_keeps_the_best_validation_round_and_scores_the_test_split_once(tmp_path, monkeypatch):
    s = make_settings([*TINY, "privacy=none", "num_clients=1", "rounds=4", "evaluation.select=best_val"])
    splits = load_splits(s.data, s.seed)
    scored = []
    real_predict = server.predict
    monkeypatch.setattr(server, "predict", lambda model, records, *args, **kwargs: scored.append(records) or real_predict(model, records, *args, **kwargs))
    federation = _RandomModelsFederation(initial_weights(s))
    lines, final, evaluation = run_rounds(federation, s, splits, RunDirectory(tmp_path), PrivacyLedger(delta=0.0), lambda line: None)

    assert all(line["auroc"] is None and line["fairness"] is None for line in lines)  # no test metric per round
    assert sum(records is splits.test for records in scored) == 1  # once, for the chosen model
    val = [line["val_auroc"] for line in lines]
    assert len(set(val)) > 1  # the rounds really differ, so the choice is not trivially the last
    best = val.index(max(val))
    assert evaluation["round"] == lines[best]["round"] and evaluation["val_auroc"] == max(val)
    assert _close(final, federation.train_round(best + 1, None, None).weights)
    assert _close(torch.load(tmp_path / "model.pt"), final)  # the saved model is the chosen one
    assert evaluation["auroc"] == pytest.approx(evaluate(s, final, splits)["auroc"])
    with pytest.raises(FedprivError, match="evaluation.select"):
        make_settings([*TINY, "evaluation.select=best_test"])


class _Killed(Exception):
    pass


def test_a_resumed_run_keeps_the_validation_choice_made_before_the_kill(tmp_path):
    s = make_settings([*TINY, "privacy=none", "num_clients=1", "rounds=4", "evaluation.select=best_val"])
    splits = load_splits(s.data, s.seed)
    template = initial_weights(s)

    def rounds(run_dir, federation, resume_from=None):
        return run_rounds(federation, s, splits, RunDirectory(run_dir), PrivacyLedger(delta=0.0), lambda line: None, resume_from)

    lines, final, evaluation = rounds(tmp_path / "whole", _RandomModelsFederation(template))
    assert evaluation["round"] <= 2  # the choice falls before the kill below, so a resume must carry it

    class KilledAfterTwo(_RandomModelsFederation):
        def train_round(self, server_round, *args):
            if server_round == 3:
                raise _Killed
            return super().train_round(server_round, *args)

    with pytest.raises(_Killed):
        rounds(tmp_path / "killed", KilledAfterTwo(template))
    checkpoint = Checkpoint.load(tmp_path / "killed")
    assert checkpoint.round == 2 and checkpoint.selected["round"] == evaluation["round"]
    resumed_lines, resumed_final, resumed = rounds(tmp_path / "killed", _RandomModelsFederation(template), checkpoint)
    assert resumed["round"] == evaluation["round"] and resumed["auroc"] == evaluation["auroc"]
    assert _close(resumed_final, final) and [l["val_auroc"] for l in resumed_lines] == [l["val_auroc"] for l in lines]


def test_ema_update_copies_first_and_keeps_integer_entries_newest():
    first = {"w": torch.tensor([2.0]), "n": torch.tensor(1)}
    average = update_average(None, first, 0.9)
    first["w"] += 1  # the average is a copy
    average = update_average(average, {"w": torch.tensor([12.0]), "n": torch.tensor(5)}, 0.9)
    assert average["w"].item() == pytest.approx(0.9 * 2 + 0.1 * 12) and average["n"].item() == 5


def test_ema_keeps_an_entry_equal_to_its_average_to_the_bit():
    frozen = torch.full((64,), 0.1) + torch.linspace(0, 1e-3, 64)
    assert not torch.equal(0.6 * frozen + (1 - 0.6) * frozen, frozen)  # the float sum moves it
    assert torch.equal(update_average({"w": frozen.clone()}, {"w": frozen.clone()}, 0.6)["w"], frozen)


# --- external test folders -----------------------------------------------------------------


def _folder_settings(root, external, extra=()):
    listed = "[" + ",".join(str(p) for p in external) + "]"
    return make_settings(["data=cbis_ddsm", f"data.root={root}", "data.image_size=32", f"data.external_test={listed}", *extra])


def test_external_test_folders_are_read_like_the_data_and_evaluated_by_name(tmp_path):
    root = write_cbis_like(tmp_path / "cbis", {"train": 6, "val": 3, "test": 3})
    for name, n in (("site_a", 4), ("site_b", 5)):
        write_class_folder(tmp_path / "ext" / name, CBIS_CLASSES, n, first_patient=1000)
    s = _folder_settings(root, [tmp_path / "ext" / "site_a", tmp_path / "ext" / "site_b"], ["num_clients=1"])
    splits = load_splits(s.data, s.seed)
    assert {k: len(v) for k, v in splits.external.items()} == {"site_a": 8, "site_b": 10}
    assert splits.external["site_b"].labels.sum() == 5 and splits.external["site_a"].images.shape[-1] == 32
    line = evaluate(s, initial_weights(s), splits)
    assert set(line["external"]) == {"site_a", "site_b"}
    assert 0 <= line["external"]["site_a"]["auroc"] <= 1 and "accuracy" in line["external"]["site_b"]


def test_external_test_folder_problems_name_the_key(tmp_path):
    root = write_cbis_like(tmp_path / "cbis", {"train": 2, "val": 1, "test": 1})
    with pytest.raises(FedprivError, match="data.external_test"):
        load_splits(_folder_settings(root, [tmp_path / "missing"]).data, 0)
    with pytest.raises(FedprivError, match="data.external_test"):
        _folder_settings(root, [tmp_path / "a" / "same", tmp_path / "b" / "same"])
