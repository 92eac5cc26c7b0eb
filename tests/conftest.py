"""Shared fixtures: composed configs, tiny settings, and the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fedpriv.settings import RunSettings, settings_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CBIS_DDSM = ROOT.parent / "shared" / "data" / "cbis-ddsm-masses"

#: A federation small enough for a test: 60 patients at 32 px, 2 rounds.
TINY = [
    "data.num_patients=60",
    "data.images_per_patient=1",
    "data.image_size=32",
    "rounds=2",
    "local_epochs=1",
    "training.batch_size=8",
    "num_clients=2",
    "evaluation.bootstrap=50",
]

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)  # never attach a test to a cluster it did not start


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("simulate", overrides=overrides)


def make_settings(overrides: list[str]) -> RunSettings:
    return settings_from_config(compose_config(overrides))


#: One federation that shows many behaviours at once: record-level (local) and client-level
#: (central) DP, 3 of 4 hospitals sampled per round, FedYogi with adaptive clipping, two
#: hospitals training at once (2 CPUs, 1 per hospital). Shared by test_simulation (accounting
#: under sampling, a server optimiser under central DP), test_determinism (the same run one
#: hospital at a time) and test_resume (the result a killed and resumed run must reproduce).
SAMPLED_LOCAL_CENTRAL = [
    *TINY, "num_clients=4", "rounds=3", "strategy=fedyogi", "strategy.clients_per_round=3",
    "privacy=local_central", "privacy.target_epsilon=4", "privacy.client_target_epsilon=5",
    "privacy.clipping=adaptive", "+backend.init_args.num_cpus=2",
]

#: The centralized non-private baseline (one hospital holds all training data), audited.
#: Shared by test_simulation (it equals local training) and test_report (the non-private run).
CENTRAL_BASELINE = [*TINY, "num_clients=1", "privacy=none", "audit=mia"]


@pytest.fixture(scope="session")
def sampled_local_central_run(tmp_path_factory):
    """The finished run of SAMPLED_LOCAL_CENTRAL: (run directory, summary). Read it only."""
    run_dir = tmp_path_factory.mktemp("sampled_local_central")
    return run_dir, _run(SAMPLED_LOCAL_CENTRAL, run_dir)


@pytest.fixture(scope="session")
def central_baseline_run(tmp_path_factory):
    """The finished run of CENTRAL_BASELINE: (run directory, summary). Read it only."""
    run_dir = tmp_path_factory.mktemp("central_baseline")
    return run_dir, _run(CENTRAL_BASELINE, run_dir)


def _run(overrides: list[str], run_dir: Path) -> dict:
    from fedpriv.experiment import run_experiment

    return run_experiment(make_settings(overrides), run_dir)


@pytest.fixture
def cbis_root() -> Path:
    if not CBIS_DDSM.is_dir():
        pytest.skip(f"real CBIS-DDSM patches not found at {CBIS_DDSM}")
    return CBIS_DDSM
