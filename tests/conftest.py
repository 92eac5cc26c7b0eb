"""Shared fixtures: composed configs, tiny settings, finished runs that several tests read,
one Ray cluster for the engine tests, and the real-data location."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fedpriv.config import settings_from_config
from fedpriv.settings import RunSettings

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
#: hospital at a time, and with the hospitals in the test process) and test_resume (the
#: result a killed and resumed run must reproduce).
SAMPLED_LOCAL_CENTRAL = [
    *TINY, "num_clients=4", "rounds=3", "strategy=fedyogi", "strategy.clients_per_round=3",
    "privacy=local_central", "privacy.target_epsilon=4", "privacy.client_target_epsilon=5",
    "privacy.clipping=adaptive", "+backend.init_args.num_cpus=2",
]

#: The centralized non-private baseline (one hospital holds all training data), audited.
#: Shared by test_simulation (it equals local training), test_report (the non-private run)
#: and test_outputs (the threshold chosen on validation).
CENTRAL_BASELINE = [*TINY, "num_clients=1", "privacy=none", "audit=mia"]


@pytest.fixture(scope="session")
def sampled_local_central_run(tmp_path_factory):
    """The finished run of SAMPLED_LOCAL_CENTRAL on the engine: (run directory, summary). Read it only."""
    from fedpriv.experiment import run_experiment

    run_dir = tmp_path_factory.mktemp("sampled_local_central")
    return run_dir, run_experiment(make_settings(SAMPLED_LOCAL_CENTRAL), run_dir)


@pytest.fixture(scope="session")
def central_baseline_run(tmp_path_factory):
    """The finished run of CENTRAL_BASELINE, its hospital in this process: (run directory,
    summary). Read it only."""
    from in_process import run_in_process

    run_dir = tmp_path_factory.mktemp("central_baseline")
    return run_dir, run_in_process(make_settings(CENTRAL_BASELINE), run_dir)


#: Ray rewrites 127.0.0.1 to the host's interface address; another loopback address keeps
#: every connection of the test cluster on the loopback interface.
LOOPBACK = "127.0.0.2"


@dataclass(frozen=True)
class RayCluster:
    """A Ray cluster this test session started: its address, its temp dir (logs), its head."""

    address: str
    temp_dir: Path
    head: subprocess.Popen

    @property
    def overrides(self) -> list[str]:
        """What attaches a run to it (it keeps running after the run)."""
        return [f"backend.address={self.address}", f"+backend.init_args._node_ip_address={LOOPBACK}"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster (2 CPUs) for the engine tests that need no Ray of their own size: each
    run attaches to it (RayCluster.overrides) instead of starting and stopping a local
    instance; stopped at the end of the session."""
    with started_ray_cluster() as cluster:
        yield cluster


@contextmanager
def started_ray_cluster(num_cpus: int = 2):
    """A Ray cluster started by `ray start --head` on loopback, stopped by its own process
    group on leaving; never `ray stop`, never RAY_ADDRESS (no other cluster is touched)."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--node-ip-address={LOOPBACK}", f"--port={port}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline, seen = time.time() + 120, ""
        while "Ray runtime started" not in seen and time.time() < deadline and head.poll() is None:
            seen += head.stdout.readline()
        assert "Ray runtime started" in seen, seen[-2000:]
        yield RayCluster(f"{LOOPBACK}:{port}", Path(temp_dir), head)
    finally:
        _stop_group(head, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _stop_group(head, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # already gone
        pass


@pytest.fixture
def flower_task(monkeypatch):
    """The identity Flower gives the server's task, which a Message built outside a running
    ServerApp (a test's own) needs."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def cbis_root() -> Path:
    if not CBIS_DDSM.is_dir():
        pytest.skip(f"real CBIS-DDSM patches not found at {CBIS_DDSM}")
    return CBIS_DDSM


def write_class_folder(folder: Path, class_folders: dict[str, int], per_class: int, size: int = 32, first_patient: int = 0) -> None:
    """PNG patches in folder/<class folder>/P_<id>_<n>.png (one image per patient): malignant
    ones carry a bright square, benign ones do not, plus noise — learnable, not trivial."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(first_patient)
    patient = first_patient
    for name, label in class_folders.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            pixels = rng.normal(100, 30, (size, size))
            if label == 1:
                pixels[size // 4 : size // 2, size // 4 : size // 2] += 80
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name / f"P_{patient:05d}_0.png")
            patient += 1


#: The CBIS-DDSM class folders (configs/data/cbis_ddsm.yaml).
CBIS_CLASSES = {"is_benign_false": 1, "is_benign_true": 0}


def write_cbis_like(root: Path, per_class: dict[str, int]) -> Path:
    """A tiny data set in the CBIS-DDSM layout: root/{train,val,test}/<class folder>/*.png,
    `per_class` images per class and split; patients never shared between splits."""
    first = 0
    for split, n in per_class.items():
        write_class_folder(root / split, CBIS_CLASSES, n, first_patient=first)
        first += 2 * n
    return root


def write_dicom(path: Path, pixels, *, slope=1.0, intercept=0.0, photometric="MONOCHROME2", window=None, **tags) -> Path:
    """A real DICOM file (digital mammography, 16-bit stored, explicit VR little endian) with
    these pixels and any further tags (e.g. PatientID="P1", ImageLaterality="L")."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
