"""Bad settings and bad files stop the run before training, with one message naming them."""

import subprocess
import sys

import pytest

from conftest import ROOT, make_settings
from fedpriv.errors import FedprivError

@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-3", "privacy.target_epsilon"),
        ("privacy.delta=0", "privacy.delta"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("num_clients=0", "num_clients"),
        ("rounds=0", "rounds"),
        ("training.lr=-1", "training.lr"),
        ("training.optimizer=rmsprop", "training.optimizer"),
        ("model.name=no_such_model", "model.name"),
        ("data.num_patients=abc", "data.num_patients"),
        ("strategy.fraction_train=0", "strategy.fraction_train"),
        ("partition=dirichlet partition.alpha=0", "partition.alpha"),
    ],
)
def test_bad_setting_names_the_key(override, key):
    with pytest.raises(FedprivError, match=key.replace(".", r"\.")):
        make_settings(override.split())


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["strategy=fedprox", "strategy.proximal_mu=-0.1"], "strategy.proximal_mu"),
        (["strategy=fedadam", "strategy.server_lr=0"], "strategy.server_lr"),
        (["strategy=fedyogi", "strategy.tau=-1"], "strategy.tau"),
        (["strategy.clients_per_round=9", "num_clients=4"], "strategy.clients_per_round"),
        (["privacy=central", "privacy.client_target_epsilon=0"], "privacy.client_target_epsilon"),
        (["privacy=central", "privacy.update_clip_norm=-1"], "privacy.update_clip_norm"),
        (["privacy=local_central", "privacy.delta=2"], "privacy.delta"),
        (["privacy=central", "privacy.clipping=sometimes"], "privacy.clipping"),
        (["privacy=central", "privacy.clipping=adaptive", "privacy.target_clipped_quantile=2"], "privacy.target_clipped_quantile"),
    ],
)
def test_bad_strategy_settings(overrides, key):
    with pytest.raises(FedprivError, match=key.replace(".", r"\.")):
        make_settings(overrides)


def test_missing_data_root_says_how_to_set_it():
    with pytest.raises(FedprivError, match=r"data\.root is not set"):
        make_settings(["data=cbis_ddsm"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["privacy.target_epsilon=0", "data.num_patients=40"], "privacy.target_epsilon"),
        (["data=cbis_ddsm"], "data.root is not set"),
        (["data=cbis_ddsm", "data.root=/nonexistent/folder"], "/nonexistent/folder"),
        (["num_clients=100000", "data.num_patients=40"], "num_clients=100000"),
    ],
)
def test_cli_stops_with_one_line_and_no_result(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpriv.simulate", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_partition_leaving_a_hospital_one_class_is_refused_when_both_are_required(tmp_path):
    from fedpriv.experiment import run_experiment

    settings = make_settings(
        ["data.num_patients=60", "data.image_size=32", "num_clients=4", "partition=dirichlet",
         "partition.alpha=0.1", "partition.min_patients=1", "partition.require_both_classes=true"]
    )
    with pytest.raises(FedprivError, match=r"leaves hospital \d+ with .*partition\.require_both_classes"):
        run_experiment(settings, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_2d_model_on_ct_volumes_is_refused_before_any_work(tmp_path):
    from fedpriv.experiment import run_experiment

    settings = make_settings(["data=phantom_ct", "data.num_patients=40", "data.image_size=16"])
    with pytest.raises(FedprivError, match=r"model\.name=fedpriv_vit_hybrid_tiny cannot take data=phantom_ct \(3D volumes"):
        run_experiment(settings, tmp_path / "run")
    assert not (tmp_path / "run").exists()
