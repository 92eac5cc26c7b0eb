"""Bad settings and bad files stop the run before training, with one message naming them."""

import re
import subprocess
import sys

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conftest import ROOT, compose_config, make_settings
from fedpriv.errors import FedprivError
from fedpriv.outputs import LOCK_FILE
from fedpriv.settings import config_error

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
        (["strategy=fedavgm", "strategy.server_momentum=1"], "strategy.server_momentum"),
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend.client_resources.num_cpus=0"], "backend.client_resources.num_cpus=0 must be > 0"),  # once: ZeroDivisionError, then a hang
        (["backend.client_resources.num_cpus=-1"], "backend.client_resources.num_cpus=-1 must be a number ≥ 0"),  # once: a silent hang
        (["backend.client_resources.num_gpus=-1"], "backend.client_resources.num_gpus=-1 must be a number ≥ 0"),
        (["~backend.client_resources.num_cpus"], "backend.client_resources.num_cpus=None must be > 0"),
        (["+backend.client_resources.memory=1e15"], "backend.client_resources.memory is not a resource Ray reserves"),
        (["backend.client_resources=3"], "backend.client_resources=3 must be a mapping"),
        (["+backend.init_args.num_cpus=true"], "backend.init_args.num_cpus=True must be a whole number"),
        (["backend.address=true"], "backend.address=True must be a string"),
        (["resume=true"], "resume=True must be a path"),  # once: TypeError in the CLI
        (["resume=[a]"], "resume=['a'] must be a path"),
        (["training=3"], "training=3 must be a group of settings"),
        (["+round=3"], "round is not a setting; did you mean rounds?"),
        (["rounds=${nope}"], "rounds: Interpolation key 'nope' not found"),
        (["data.fairness_attributes=abc"], "data.fairness_attributes='abc' must be a mapping"),
        (["data.fairness_attributes.age=[65,50]"], "data.fairness_attributes.age=[65, 50] must be increasing bin edges"),  # once: a crash at evaluation
        (["+model.kwargs.foo=1"], "model.kwargs do not fit"),  # once: found only after the data was generated
        (["model.kwargs.num_heads=0"], "model.kwargs do not fit"),  # once: ZeroDivisionError
        (["privacy=central", "privacy.client_target_epsilon=0.0001"], "privacy.client_target_epsilon=0.0001 cannot be reached"),
    ],
)
def test_bad_backend_resume_and_group_settings_are_refused_before_any_work(overrides, message):
    with pytest.raises(FedprivError, match=re.escape(message)):
        make_settings(overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=resnet9000"], "model=resnet9000 is not an option of model; choose one of cnn3d_small"),
        (["data=foo"], "data=foo is not an option of data; choose one of breastmnist"),
        (["privacy.target_epsilonn=3"], "privacy.target_epsilonn is not a setting of privacy; did you mean privacy.target_epsilon?"),
        (["data.foo.bar=1"], "data.foo is not a setting of data"),
        (["rounds=[1,2"], "'rounds=[1,2' is not a valid override"),
    ],
)
def test_hydras_own_errors_become_one_line_naming_the_key(overrides, message):
    try:
        compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        assert str(config_error(error)).startswith(message)
    else:
        pytest.fail("composed")


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
        (["data=foo"], "data=foo is not an option of data; choose one of breastmnist, cbis_ddsm, image_folder, manifest, phantom_ct, phantom_mammo"),
        (["privacy.target_epsilonn=3"], "privacy.target_epsilonn is not a setting of privacy; did you mean privacy.target_epsilon?"),
        (["resume=true"], "resume=True must be the run directory to continue"),
        (["backend.client_resources.num_cpus=0"], "backend.client_resources.num_cpus=0 must be > 0"),
        (["backend.client_resources.num_cpus=64", "data.num_patients=40"], "backend.client_resources.num_cpus=64 is more than"),
    ],
)
def test_cli_stops_with_one_line_and_no_result(tmp_path, args, needle):
    """Exit status 2 and one line naming the key, unwrapped although piped (the needles are
    longer than 80 columns), from Hydra's errors as from fedpriv's; no progress bar, no Flower."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpriv.simulate", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fedpriv: ") and needle in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "round 0/" not in proc.stderr and "fraction_evaluate" not in proc.stderr  # nothing started
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
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]  # held for the run, nothing written
