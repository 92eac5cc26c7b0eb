"""Random and extreme configs and malformed files at the entry points: a clean result or one
clear one-line error (FedprivError, or Hydra's own error as the CLI words it), never another
exception, a traceback, a hang, or a run directory that looks complete."""

import math
import subprocess
import sys

import numpy as np
import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import ROOT, compose_config
from fedpriv.data.readers import ReadOptions, read_file
from fedpriv.errors import FedprivError
from fedpriv.experiment import prepare
from fedpriv.config import settings_from_config
from fedpriv.settings import config_error

GROUPS = {
    "data": ["phantom_mammo", "phantom_ct", "cbis_ddsm", "manifest", "breastmnist", "image_folder"],
    "privacy": ["none", "local", "central", "local_central"],
    "partition": ["iid", "dirichlet", "quantity", "by_column"],
    "strategy": ["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"],
    "model": ["vit_hybrid_tiny", "cnn_small", "cnn3d_small"],
    "audit": ["none", "mia"],
    "logger": ["none", "mlflow", "tensorboard"],
}
#: Small enough that a config that validates can also be prepared (data generated, partitioned).
SMALL = ["data.num_patients=40", "data.image_size=16"]


def _leaf_keys() -> list[str]:
    """Every setting of the default config and of each data source (paths among them)."""
    keys = set()

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    for data in GROUPS["data"]:
        walk(OmegaConf.to_container(compose_config([f"data={data}"]), resolve=False), "")
    return sorted(k for k in keys if not k.startswith("hydra"))


KEYS = _leaf_keys()


def _literal(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return f"'{value}'"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    return repr(value)


SCALARS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.sampled_from([0, 1, -1, 2, 3, 100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-12, 0.5, 1.0, 1e9]),
    st.text("abcxyz_09", max_size=6),
    st.sampled_from(["/nonexistent/x", ".", "/", "~"]),  # paths where numbers (or other paths) are expected
    st.booleans(),
    st.none(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))  # lists where scalars or paths are expected
#: What a user may ask Ray to reserve per hospital, right or wrong (Flower hands them to Ray).
RESOURCES = ["num_cpus", "num_gpus", "memory", "CPU", "GPU", "resources", "foo"]
OVERRIDES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={_literal(kv[1])}"),
        st.sampled_from(list(GROUPS)).flatmap(lambda g: st.sampled_from(GROUPS[g]).map(lambda o: f"{g}={o}")),
        st.tuples(st.sampled_from(["backend.client_resources", "backend.init_args"]), st.sampled_from(RESOURCES), VALUES)
        .map(lambda kv: f"++{kv[0]}.{kv[1]}={_literal(kv[2])}"),
    ),
    max_size=4,
)


def _settings_or_clear_error(overrides):
    """Compose and validate; return settings, or None after one clear error: one line, as the
    CLI prints it (Hydra's own errors included)."""
    try:
        return settings_from_config(compose_config(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        message = str(config_error(error))
    except FedprivError as error:
        message = str(error)
    assert message and "\n" not in message.strip()
    return None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_random_configs_validate_or_name_the_problem(overrides):
    _settings_or_clear_error(overrides)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_random_small_configs_prepare_or_name_the_problem(overrides):
    """Past validation: data generated/read, partitioned, privacy plan checked — or one error."""
    run_settings = _settings_or_clear_error([*SMALL, *overrides])
    if run_settings is None or getattr(run_settings.data, "num_patients", 40) > 400:
        return
    try:
        plan = prepare(run_settings)
    except FedprivError:
        return
    assert sum(len(rows) for rows in plan.shards) == len(plan.splits.train)


SUFFIXES = [".png", ".dcm", ".nii.gz", ".nii", ".npy", ".tiff"]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(SUFFIXES), st.binary(max_size=600), st.integers(16, 40))
def test_malformed_files_are_read_or_named(tmp_path_factory, suffix, content, size):
    path = tmp_path_factory.mktemp("f") / f"item{suffix}"
    path.write_bytes(content)
    try:
        pixels = read_file(path, ReadOptions(size)).pixels
    except FedprivError as error:
        assert "item" in str(error)
        return
    assert pixels.dtype == np.float32 and pixels.min() >= 0 and pixels.max() <= 1


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([".npy"]), st.lists(st.integers(0, 5), min_size=0, max_size=4), st.sampled_from(["f4", "f8", "i2", "u1", "c8", "b1", "U3"]))
def test_arrays_of_any_shape_and_dtype_are_read_or_named(tmp_path_factory, suffix, shape, dtype):
    path = tmp_path_factory.mktemp("a") / f"item{suffix}"
    np.save(path, np.full(shape, "x1" if dtype == "U3" else 1, dtype=dtype))
    try:
        pixels = read_file(path, ReadOptions(16)).pixels
    except FedprivError:
        return
    assert pixels.shape in ((1, 16, 16), (1, 16, 16, 16))


EXTREME = [
    ["rounds=1000000000", "data.num_patients=100000000"],
    ["data.image_size=9999"],
    ["privacy.target_epsilon=inf"],
    ["privacy.target_epsilon=0.001"],  # below what RDP can certify: once an endless σ search
    ["num_clients=3", "partition=by_column", "partition.column=nope"],
    ["faults.client_failure_rate=nan"],
    ["data.num_patients=12", "num_clients=12"],
]


@pytest.mark.parametrize("overrides", EXTREME)
def test_extreme_configs_stop_before_training_with_one_clear_error(overrides):
    run_settings = _settings_or_clear_error([*SMALL, *overrides] if "data.image_size=9999" not in overrides else overrides)
    if run_settings is not None:
        with pytest.raises(FedprivError):
            prepare(run_settings)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [EXTREME[0], EXTREME[3]])
def test_extreme_configs_through_the_cli_stop_with_one_line(tmp_path, overrides):
    """Slow: these configs stop with a FedprivError (default: test_extreme_configs_stop_before_training_with_one_clear_error),
    and the CLI turns a FedprivError from validation or from preparation into one line, exit
    status 2, no traceback, no result (default: test_bad_input.test_cli_stops_with_one_line_and_no_result)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpriv.simulate", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir / "summary.json").exists()
