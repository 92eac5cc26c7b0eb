"""Bad settings and bad files stop the run before training, with one message naming them."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_settings
from fedpriv.data.image_folder import read_split_folders
from fedpriv.errors import FedprivError

CLASSES = {"is_benign_false": 1, "is_benign_true": 0}
SPLITS = {"train": "train", "val": "val", "test": "test"}


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


def _write_png(path, value=128, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _make_folder_dataset(root, patients=4):
    for split in SPLITS:
        for folder in CLASSES:
            for p in range(patients):
                _write_png(root / split / folder / f"patientx__P_{split}{p:03d}_img_{folder}.png")


def test_folder_dataset_reads_labels_and_patients(tmp_path):
    _make_folder_dataset(tmp_path)
    data = read_split_folders(tmp_path, SPLITS, CLASSES, 16, r"(P_\w+?)_img")
    assert len(data.train) == 8 and data.train.images.shape == (8, 1, 16, 16)
    assert sorted(set(data.train.labels)) == [0, 1]
    assert data.test.patient_ids[0].startswith("P_test")


def test_empty_class_folder_is_named(tmp_path):
    _make_folder_dataset(tmp_path)
    for f in (tmp_path / "val" / "is_benign_true").iterdir():
        f.unlink()
    with pytest.raises(FedprivError, match=r"val/is_benign_true has no images"):
        read_split_folders(tmp_path, SPLITS, CLASSES, 16, r"(P_\w+?)_img")


def test_unreadable_image_is_named(tmp_path):
    _make_folder_dataset(tmp_path)
    broken = tmp_path / "train" / "is_benign_false" / "patientx__P_bad_img_x.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(FedprivError, match="P_bad_img_x.png cannot be read"):
        read_split_folders(tmp_path, SPLITS, CLASSES, 16, r"(P_\w+?)_img")


def test_patient_in_two_splits_is_refused(tmp_path):
    _make_folder_dataset(tmp_path)
    _write_png(tmp_path / "test" / "is_benign_true" / "patientx__P_train000_img_dup.png")
    with pytest.raises(FedprivError, match="P_train000 is in both"):
        read_split_folders(tmp_path, SPLITS, CLASSES, 16, r"(P_\w+?)_img")


def test_missing_root_folder(tmp_path):
    with pytest.raises(FedprivError, match="is not a folder"):
        read_split_folders(tmp_path / "nope", SPLITS, CLASSES, 16, r"(P_\w+)")


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
