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


@pytest.fixture
def cbis_root() -> Path:
    if not CBIS_DDSM.is_dir():
        pytest.skip(f"real CBIS-DDSM patches not found at {CBIS_DDSM}")
    return CBIS_DDSM
