"""End to end with real Flower, Opacus and timm: on Flower's simulation engine (Ray) where
the engine is what is tested (sampling and concurrency, failures, timeouts), else with the
hospitals in this process (tests/in_process.py)."""

import json
import math

import pytest
import timm
from timm.models import register_model

import torch

from conftest import CENTRAL_BASELINE, TINY, make_settings
from fedpriv.client import HospitalTrainer
from fedpriv.errors import FedprivError
from fedpriv.server import initial_weights
from fedpriv.experiment import run_experiment
from fedpriv.models import SmallGroupNormCNN
from in_process import run_in_process
from test_accounting import dp_accounting_epsilon


def read_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: Shared by the membership audit: 400 patients, so that a non-private twin (LEAKY) can overfit.
AUDITED = ["data.num_patients=400", "data.images_per_patient=1", "data.image_size=32", "data.test_fraction=0.3",
           "data.class_separation=1.0", "num_clients=2", "rounds=2", "training.batch_size=16", "audit=mia"]
#: One record-level DP run seen from two sides: its accounting and outputs (FedProx: the
#: strategy must not change what records cost), and the private half of the membership audit.
PRIVATE = [*AUDITED, "privacy.target_epsilon=1", "local_epochs=5", "strategy=fedprox", "evaluation.bootstrap=50"]
LEAKY = [*AUDITED, "privacy=none", "local_epochs=25", "evaluation.bootstrap=0"]


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    """(settings, run directory, summary, the lines on_round saw) of the finished PRIVATE run."""
    settings, run_dir, rounds_seen = make_settings(PRIVATE), tmp_path_factory.mktemp("private"), []
    summary = run_in_process(settings, run_dir, on_round=rounds_seen.append)
    return settings, run_dir, summary, rounds_seen


def test_federated_dp_run_with_fedprox_is_accounted_cumulatively_and_cross_checked(private_run):
    """FedProx changes how hospitals train and how updates are aggregated, never what a
    hospital's records cost: the same cross-checked accounting as under FedAvg (the strategy
    of most other runs here)."""
    settings, run_dir, summary, rounds_seen = private_run
    assert summary["settings"]["strategy"]["name"] == "fedprox" and settings.strategy.proximal_mu > 0
    target = settings.privacy.target_epsilon

    lines = read_lines(run_dir)
    assert [line["round"] for line in lines] == [1, 2] and len(rounds_seen) == 2
    for line in lines:
        assert line["hospitals_trained"] == [0, 1] and line["hospitals_failed"] == {}
        for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "val_auroc", "train_loss"):
            assert line[key] is not None and math.isfinite(line[key])
    for h in ("0", "1"):  # ε after round 2 strictly above round 1: cumulative, never reset
        assert 0 < lines[0]["epsilon"][h] < lines[1]["epsilon"][h]

    privacy = summary["privacy"]
    assert privacy["mode"] == "local" and privacy["delta"] == 1e-5
    ledger = json.loads((run_dir / "ledger.json").read_text())
    for h, info in privacy["hospitals"].items():
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"] if str(e["hospital"]) == h]
        assert len(history) == 2 and sum(s for _, _, s in history) == info["steps"]
        # σ was calibrated for the whole planned run: the final ε lands on the target
        assert info["epsilon"] <= target and info["epsilon"] == pytest.approx(target, rel=0.02)
        assert info["epsilon"] == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)
        assert info["epsilon"] == pytest.approx(lines[-1]["epsilon"][h])
    assert privacy["max_epsilon"] == max(v["epsilon"] for v in privacy["hospitals"].values())

    for line in lines:  # subgroup metrics every round, for each configured attribute
        assert set(line["fairness"]) == {"site", "age", "hospital"}
        groups = line["fairness"]["age"]["groups"]
        assert set(groups) <= {"<50", "50-65", ">=65"} and sum(g["n"] for g in groups.values()) == line_test_size(settings)
        own = line["fairness"]["hospital"]["groups"]  # each hospital's own test patients
        assert set(own) == {"h0", "h1"} and sum(g["n"] for g in own.values()) == line_test_size(settings)

    written = json.loads((run_dir / "summary.json").read_text())
    assert written["fairness"] == lines[-1]["fairness"]
    low, high = written["test_ci95"]["auroc"]
    assert low <= written["test"]["auroc"] <= high
    assert written["test"]["auroc"] == pytest.approx(lines[-1]["auroc"])
    assert written["num_clients"] == 2 and written["rounds"] == 2 and written["wall_seconds"] > 0
    assert sum(row["patients"] for row in written["partition"]) == len(set(_train_patients(settings)))
    for name in ("model.pt", "rounds.png", "privacy_utility.png", "partition.json", "partition.png"):
        assert (run_dir / name).stat().st_size > 0


def line_test_size(settings):
    from fedpriv.data.sources import load_splits

    return len(load_splits(settings.data, settings.seed).test)


def test_fairness_attribute_missing_from_metadata_is_named(tmp_path):
    settings = make_settings([*TINY, "+data.fairness_attributes.scanner=[]"])
    with pytest.raises(FedprivError, match="'scanner' is not in the metadata"):
        run_experiment(settings, tmp_path)


def _train_patients(settings):
    from fedpriv.data.sources import load_splits

    return load_splits(settings.data, settings.seed).train.patient_ids


def test_central_baseline_is_one_hospital_with_all_training_data_and_equals_local_training(tmp_path, central_baseline_run):
    run_dir, summary = central_baseline_run  # conftest.CENTRAL_BASELINE
    settings = make_settings(CENTRAL_BASELINE)
    assert len(summary["partition"]) == 1
    assert summary["partition"][0]["patients"] == len(set(_train_patients(settings)))
    assert summary["privacy"] == {"mode": "none"}
    lines = read_lines(run_dir)
    assert len(lines) == 2 and lines[-1]["epsilon"] is None and lines[-1]["hospitals_trained"] == [0]

    # FedAvg over one hospital is plain local training: redo both rounds in this process.
    trainer, weights = HospitalTrainer(settings, str(tmp_path / "replay")), initial_weights(settings)
    for server_round in (1, 2):
        weights, _ = trainer(0, weights, {"server-round": server_round})
    federated = torch.load(run_dir / "model.pt")
    for name, tensor in weights.items():
        assert torch.allclose(federated[name], tensor, atol=1e-5), name


@register_model
def fedpriv_test_only_in_this_process(pretrained=False, **kwargs):
    """Registered only in the test process: Ray workers cannot build it, so every hospital fails."""
    kwargs.pop("img_size", None)
    return SmallGroupNormCNN(in_chans=kwargs.get("in_chans", 1), widths=(8,))


@pytest.mark.slow
def test_round_with_no_successful_hospital_stops_the_run_with_the_cause(tmp_path):
    """Slow: the same stop (no hospital trained: the run ends naming each hospital's exception,
    no summary) is asserted by the default test_too_few_replies_stop_the_run_with_the_cause_and_keep_the_ledger;
    here the exception comes from the worker building the model instead of after training."""
    assert timm.is_model("fedpriv_test_only_in_this_process")
    settings = make_settings([*TINY, "model=cnn_small", "model.name=fedpriv_test_only_in_this_process"])
    with pytest.raises(FedprivError, match=r"round 1: 0 hospital\(s\) trained.*fedpriv_test_only_in_this_process"):
        run_experiment(settings, tmp_path)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.realdata
def test_short_federated_dp_run_on_cbis_ddsm(tmp_path, cbis_root):
    settings = make_settings(
        ["data=cbis_ddsm", f"data.root={cbis_root}", "data.image_size=32", "num_clients=3", "rounds=1",
         "local_epochs=1", "privacy.target_epsilon=6", "privacy.delta=1e-4"]
    )
    summary = run_in_process(settings, tmp_path)
    table = summary["partition"]
    assert len(table) == 3 and sum(row["images"] for row in table) == 1104
    assert all(row["patients"] > 0 for row in table)
    assert summary["privacy"]["max_epsilon"] == pytest.approx(6.0, rel=0.02)
    assert 0.0 <= summary["test"]["auroc"] <= 1.0


def test_failure_reason_is_the_exception_message_without_ray_wrapping():
    from fedpriv.federation import short_reason

    raw = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
        "(pid=1)\n  File \"x.py\", line 1\nflwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: data.root='/x' is not a folder'>"
    )
    assert short_reason(raw) == "data.root='/x' is not a folder"
    assert short_reason("plain failure") == "plain failure"


def test_budget_stops_exactly_the_hospitals_that_would_exceed_it_and_the_run_ends_cleanly(tmp_path):
    # planned for ε=4 over 3 rounds; a cap of 2.6 allows one round (≈2.3) but not two (≈3.3)
    settings = make_settings([*TINY, "rounds=3", "privacy.target_epsilon=4", "privacy.budget_epsilon=2.6"])
    summary = run_in_process(settings, tmp_path)
    lines = read_lines(tmp_path)
    assert len(lines) == 1 and summary["rounds_completed"] == 1 and summary["rounds"] == 3
    for info in summary["privacy"]["hospitals"].values():
        assert 0 < info["epsilon"] <= 2.6
    assert (tmp_path / "summary.json").exists()


def test_budget_below_one_round_is_refused_before_any_work(tmp_path):
    settings = make_settings([*TINY, "privacy.target_epsilon=4", "privacy.budget_epsilon=0.1"])
    with pytest.raises(FedprivError, match="privacy.budget_epsilon=0.1 is below what one round costs"):
        run_experiment(settings, tmp_path)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "partition.json").exists()


def test_local_and_central_dp_with_sampling_report_both_and_the_ledger_skips_unsampled_rounds(sampled_local_central_run):
    run_dir, summary = sampled_local_central_run  # conftest.SAMPLED_LOCAL_CENTRAL
    lines = read_lines(run_dir)  # 3 rounds, 3 of 4 hospitals each: one left out of every round
    assert len(lines) == 3 and all(len(line["hospitals_trained"]) == 3 for line in lines)

    # client level: one release per round, on target, and dp-accounting agrees (no amplification)
    client = summary["privacy"]["client_level"]
    assert client["releases"] == 3 and client["clients_per_round"] == 3
    assert client["epsilon"] == pytest.approx(5.0, rel=0.02) and client["epsilon"] <= 5.0
    assert client["epsilon"] == pytest.approx(dp_accounting_epsilon([(client["noise_multiplier"], 1.0, 3)], 1e-5), rel=0.01)
    assert [line["client_epsilon"] for line in lines] == sorted(line["client_epsilon"] for line in lines)

    # record level: a hospital's ε moves only in rounds it trained in
    ledger = json.loads((run_dir / "ledger.json").read_text())
    for h in ("0", "1", "2", "3"):
        trained_in = [line["round"] for line in lines if int(h) in line["hospitals_trained"]]
        recorded = [e["round"] for e in ledger["entries"] if str(e["hospital"]) == h and e["mechanism"] == "dp-sgd"]
        assert recorded == trained_in
        previous = 0.0
        for line in lines:
            eps = line["epsilon"][h]
            assert eps > previous if line["round"] in trained_in else eps == previous
            previous = eps


def test_server_optimiser_under_central_dp(tmp_path):
    settings = make_settings([*TINY, "strategy=fedadam", "privacy=central", "privacy.client_target_epsilon=3"])
    summary = run_in_process(settings, tmp_path)
    lines = read_lines(tmp_path)
    assert summary["privacy"]["client_level"]["clipping"] == "fixed"
    assert all(line["released"] and math.isfinite(line["auroc"]) for line in lines)
    assert "hospitals" not in summary["privacy"]
    assert summary["privacy"]["client_level"]["epsilon"] == pytest.approx(3.0, rel=0.02)
    assert read_lines(tmp_path)[-1]["epsilon"] is None


def test_server_optimiser_with_adaptive_clipping_under_central_dp_and_local_dp(sampled_local_central_run):
    """FedYogi under adaptive clipping, in the shared local + central run (central DP alone is
    checked with FedAdam and fixed clipping above)."""
    run_dir, summary = sampled_local_central_run
    assert summary["settings"]["strategy"]["name"] == "fedyogi"
    assert summary["privacy"]["client_level"]["clipping"] == "adaptive"
    assert all(line["released"] and math.isfinite(line["auroc"]) for line in read_lines(run_dir))
    assert summary["privacy"]["client_level"]["epsilon"] == pytest.approx(5.0, rel=0.02)


def test_membership_audit_finds_leakage_without_dp_and_none_beyond_epsilon_1(tmp_path, private_run):
    """audit=mia on whole runs: an overfit non-private model leaks clearly more than an
    ε = 1 model, whose empirical ε lower bound stays below its accounted ε."""
    leaky = run_in_process(make_settings(LEAKY), tmp_path / "none")["audit"]
    private = private_run[2]["audit"]
    assert private_run[0].privacy.target_epsilon == 1

    # a positive ε lower bound that the attack proves at 95% (measured: attack AUROC 0.69, bound 0.43)
    assert leaky["pooled"]["attack_auroc"] > 0.65 and leaky["pooled"]["epsilon_lower_bound_ci"] > 0.3
    assert private["pooled"]["attack_auroc"] < leaky["pooled"]["attack_auroc"] - 0.1
    assert private["accounted_epsilon"] == pytest.approx(1.0, rel=0.02)
    assert private["pooled"]["epsilon_lower_bound_ci"] <= private["accounted_epsilon"]
    assert leaky["accounted_epsilon"] == math.inf  # no record-level DP: nothing bounds it
    for audit in (leaky, private):
        assert set(audit["hospitals"]) == {"0", "1"}
        assert sum(h["n_members"] for h in audit["hospitals"].values()) == audit["pooled"]["n_members"]
        assert audit["pooled"]["n_nonmembers"] == 180  # validation + test patients
    written = json.loads((tmp_path / "none" / "summary.json").read_text())["audit"]
    # JSON has no infinity: an unbounded ε is written "inf" (never null, which reads as "no value")
    assert written["accounted_epsilon"] == "inf" and float(written["accounted_epsilon"]) == math.inf
    assert written["pooled"] == leaky["pooled"]


def test_injected_crashes_and_hangs_complete_rounds_and_keep_the_privacy_spent(tmp_path, ray_cluster):
    """Hospitals that train and then crash or hang: the round goes on with the rest, the
    failures are logged and counted, and what they spent is in the ledger. The server hears
    of a failed hospital's spending only later, but no metrics line may show less than the
    hospital's own record holds so far."""
    settings = make_settings(
        [*TINY, "num_clients=4", "rounds=2", "faults.client_failure_rate=0.25", "faults.client_hang_rate=0.15",
         "faults.client_timeout=20", "backend.client_resources.num_cpus=0.5", *ray_cluster.overrides]  # 12 s was missed by every hospital on a loaded machine
    )
    summary = run_experiment(settings, tmp_path)
    lines = read_lines(tmp_path)
    failed = {(line["round"], int(h)): reason for line in lines for h, reason in line["hospitals_failed"].items()}
    assert any("injected failure" in r for r in failed.values()), failed  # crashes (seeded: this seed has some)
    assert any("injected" not in r for r in failed.values()), failed  # and timeouts
    assert summary["failures"]["count"] == len(failed) and summary["rounds_completed"] == 2
    for line in lines:
        assert len(line["hospitals_trained"]) + len(line["hospitals_failed"]) == 4
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    recorded = {(e["round"], e["hospital"]) for e in ledger["entries"]}
    assert set(failed) <= recorded  # trained, then failed: spent all the same
    assert lines[0]["hospitals_failed"]  # this seed has crashes in round 1, and the crashed hospital 0 hangs in round 2
    for h in range(4):
        spent = json.loads((tmp_path / "hospitals" / f"hospital_{h}.json").read_text())["spent"]
        assert [(s["round"], s["steps"]) for s in spent] == [(e["round"], e["steps"]) for e in ledger["entries"] if e["hospital"] == h]
        assert summary["privacy"]["hospitals"][str(h)]["epsilon"] == pytest.approx(ledger["epsilon"][str(h)])
        for line in lines:
            so_far = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in spent if s["round"] <= line["round"]]
            assert line["epsilon"][str(h)] >= dp_accounting_epsilon(so_far, settings.privacy.delta) * (1 - 1e-3), (h, line["round"])
            if str(h) in line["hospitals_failed"]:
                assert h in line["epsilon_unconfirmed"]  # and it says that its record is not read yet


def test_too_few_replies_stop_the_run_with_the_cause_and_keep_the_ledger(tmp_path, ray_cluster):
    settings = make_settings([*TINY, "faults.client_failure_rate=1.0", "faults.min_replies=1", *ray_cluster.overrides])
    with pytest.raises(FedprivError, match=r"round 1: 0 hospital\(s\) trained, fewer than faults\.min_replies=1.*injected failure"):
        run_experiment(settings, tmp_path)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert {e["hospital"] for e in ledger["entries"]} == {0, 1}  # both trained before crashing
    assert not (tmp_path / "summary.json").exists()


def test_ct_volumes_run_the_federated_dp_simulation_with_a_3d_model(tmp_path):
    settings = make_settings(["data=phantom_ct", "model=cnn3d_small", "data.num_patients=80", "data.image_size=16",
                              "rounds=2", "local_epochs=1", "training.batch_size=8", "num_clients=2",
                              "evaluation.bootstrap=0", "privacy.target_epsilon=4"])
    summary = run_in_process(settings, tmp_path)
    assert summary["data"] == "phantom_ct" and summary["rounds_completed"] == 2
    assert summary["privacy"]["max_epsilon"] == pytest.approx(4.0, rel=0.02)
    assert set(summary["fairness"]) == {"site", "sex", "age", "hospital"}
    weights = torch.load(tmp_path / "model.pt")
    assert any(w.dim() == 5 for w in weights.values())  # Conv3d kernels: it really trained a 3D net
