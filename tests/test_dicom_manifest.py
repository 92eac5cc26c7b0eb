"""A researcher's own DICOM folder: the manifest from the files' tags (`fedpriv data manifest`),
training on it centralized and in 3 hospitals, and external test sets without patient ids."""

import csv
import math

import numpy as np
import pytest
from PIL import Image

from conftest import make_settings, write_dicom
from fedpriv.cli import main as fedpriv_main
from fedpriv.data.dicom_manifest import build_manifest
from fedpriv.data.image_folder import read_split_folders
from fedpriv.data.readers import ReadOptions, read_file
from fedpriv.data.records import DataProblems
from fedpriv.errors import FedprivError
from in_process import run_in_process

#: conftest.TINY without its phantom-only keys.
SMALL_RUN = ["rounds=2", "local_epochs=1", "training.batch_size=8", "evaluation.bootstrap=50"]


def write_study(folder, patients: dict[str, str], seed: int, patient_ids: bool = True) -> list:
    """Two views (left and right CC) per patient as 12-bit DICOM files; a malignant patient's
    images carry a bright square. Every third patient's files have no .dcm suffix (as PACS
    exports write them). Returns the files written."""
    rng = np.random.default_rng(seed)
    written = []
    for n, (patient, label) in enumerate(patients.items()):
        for side in ("L", "R"):
            pixels = rng.normal(1500, 300, (40, 40))
            if label == "malignant":
                pixels[10:22, 10:22] += 1200
            name = f"{patient}_{side}CC" + ("" if n % 3 == 2 else ".dcm")
            tags = {"PatientID": patient} if patient_ids else {}
            written.append(write_dicom(folder / patient / name, pixels.clip(0, 4095), ImageLaterality=side, ViewPosition="CC", **tags))
    return written


def write_labels(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_manifest_from_dicom_tags_trains_centralized_and_in_three_hospitals_with_an_external_site(tmp_path):
    patients = {f"PAT{i:03d}": "malignant" if i % 2 else "benign" for i in range(40)}
    write_study(tmp_path / "dicom", patients, seed=0)
    write_study(tmp_path / "dicom", {"UNLABELLED": "benign"}, seed=1)  # not in labels.csv: left out, counted
    (tmp_path / "dicom" / "notes.txt").write_text("not an image")
    labels = write_labels(tmp_path / "labels.csv", ["PatientID", "label", "age"],
                          [[p, label, 40 + i] for i, (p, label) in enumerate(patients.items())])
    manifest = tmp_path / "manifest.csv"
    assert fedpriv_main(["data", "manifest", str(tmp_path / "dicom"), "--labels", str(labels), "--out", str(manifest)]) == 0
    rows = read_rows(manifest)
    assert len(rows) == 80 and {r["patient_id"] for r in rows} == set(patients)
    assert {r["laterality"] for r in rows} == {"L", "R"} and {r["view"] for r in rows} == {"CC"}
    assert all(r["label"] == patients[r["patient_id"]] for r in rows) and rows[0]["age"] == "40"
    assert any(not r["path"].endswith(".dcm") for r in rows)  # suffix-less DICOM files are found and listed

    # an external site: no PatientID in its files, labels keyed by file name
    site = {f"EXT{i}": "malignant" if i % 2 else "benign" for i in range(6)}
    files = write_study(tmp_path / "site_b", site, seed=2, patient_ids=False)
    site_labels = write_labels(tmp_path / "site_b_labels.csv", ["file", "label"],
                               [[f.name, site[f.parent.name]] for f in files])
    external = tmp_path / "site_b.csv"
    assert fedpriv_main(["data", "manifest", str(tmp_path / "site_b"), "--labels", str(site_labels), "--out", str(external)]) == 0
    assert {r["patient_id"] for r in read_rows(external)} == {""}

    common = [*SMALL_RUN, "data=manifest", f"data.manifest={manifest}", "data.image_size=32", f"data.external_test=[{external}]"]
    for hospitals in (1, 3):
        summary = run_in_process(make_settings([*common, f"num_clients={hospitals}"]), tmp_path / f"run_{hospitals}")
        table = summary["partition"]
        assert len(table) == hospitals and summary["rounds_completed"] == 2
        assert sum(row["patients"] for row in table) == 28  # 70 % of the 40 patients, whole patients per hospital
        assert all(row["images"] == 2 * row["patients"] for row in table)
        assert 0 <= summary["test"]["auroc"] <= 1 and 0 <= summary["val"]["auroc"] <= 1
        assert 0 <= summary["external"]["site_b"]["auroc"] <= 1  # reported by the CSV's name
        assert math.isfinite(summary["threshold"]["value"])


def test_labels_keyed_by_other_tags_or_file_and_every_file_left_out_is_named(tmp_path):
    files = write_study(tmp_path / "dicom", {"P_001_LEFT": "benign", "P_002_LEFT": "malignant"}, seed=0)
    (tmp_path / "dicom" / "DICOMDIR").write_bytes(b"\0" * 10)  # not DICOM at all
    import pydicom

    uids = {f.name: pydicom.dcmread(f).SOPInstanceUID for f in files}
    by_uid = write_labels(tmp_path / "uid.csv", ["SOPInstanceUID", "label", "split"],
                          [[uid, "1" if "002" in name else "0", "train"] for name, uid in uids.items() if "RCC" not in name])
    result = build_manifest(tmp_path / "dicom", by_uid, tmp_path / "out" / "m.csv")
    assert len(result.rows) == 2 and len(result.unlabelled) == 2 and result.skipped == ["DICOMDIR: not a DICOM file"]
    rows = read_rows(tmp_path / "out" / "m.csv")
    assert {r["split"] for r in rows} == {"train"}  # the labels CSV's other columns are carried
    assert read_file((tmp_path / "out" / rows[0]["path"]).resolve(), ReadOptions(16)).pixels.shape == (1, 16, 16)

    # PatientID and laterality together (labels per breast); --patient-pattern cuts the patient id out of PatientID
    per_breast = write_labels(tmp_path / "breast.csv", ["PatientID", "ImageLaterality", "label"],
                              [["P_001", "L", "benign"], ["P_001", "R", "malignant"], ["P_002", "L", "malignant"]])
    result = build_manifest(tmp_path / "dicom", per_breast, tmp_path / "b.csv", patient_pattern=r"(P_\d+)")
    assert sorted((r["patient_id"], r["laterality"], r["label"]) for r in result.rows) == [
        ("P_001", "L", "benign"), ("P_001", "R", "malignant"), ("P_002", "L", "malignant")]
    assert result.unlabelled == [f"P_002_LEFT/{files[3].name}"]

    with pytest.raises(FedprivError, match="no key column"):
        build_manifest(tmp_path / "dicom", write_labels(tmp_path / "k.csv", ["patient", "label"], [["x", "1"]]), tmp_path / "k.out")
    with pytest.raises(FedprivError, match="no column 'label'.*--label-column"):
        build_manifest(tmp_path / "dicom", write_labels(tmp_path / "l.csv", ["PatientID", "class"], [["x", "1"]]), tmp_path / "l.out")
    twice = write_labels(tmp_path / "t.csv", ["PatientID", "label"], [["P_001_LEFT", "0"], ["P_001_LEFT", "1"]])
    with pytest.raises(FedprivError, match="line 3.*listed twice"):
        build_manifest(tmp_path / "dicom", twice, tmp_path / "t.out")
    with pytest.raises(FedprivError, match="no DICOM image .* has a label"):
        build_manifest(tmp_path / "dicom", write_labels(tmp_path / "n.csv", ["PatientID", "label"], [["nobody", "1"]]), tmp_path / "n.out")


def test_external_test_folder_needs_no_patient_ids(tmp_path):
    """Training folders must name the patient in each file; an external test folder need not."""
    for split in ("train", "val", "test"):
        for folder, value in (("malignant", 200), ("benign", 50)):
            for p in range(2):
                (tmp_path / "data" / split / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((20, 20), value, np.uint8)).save(tmp_path / "data" / split / folder / f"P_{split}{p}_{folder}.png")
    for folder, value in (("malignant", 200), ("benign", 50)):
        (tmp_path / "site_x" / folder).mkdir(parents=True)
        for n in range(3):
            Image.fromarray(np.full((20, 20), value, np.uint8)).save(tmp_path / "site_x" / folder / f"scan{n}.png")
    classes, splits = {"malignant": 1, "benign": 0}, {"train": "train", "val": "val", "test": "test"}
    data = read_split_folders(tmp_path / "data", splits, classes, ReadOptions(16), r"(P_\w+?)_", DataProblems(),
                              external=(tmp_path / "site_x",))
    assert len(data.external["site_x"]) == 6 and len(set(data.external["site_x"].patient_ids)) == 6
    with pytest.raises(FedprivError, match="no patient id in the file name"):  # training data still needs them
        read_split_folders(tmp_path / "site_x", {"train": ".", "val": ".", "test": "."}, classes, ReadOptions(16),
                           r"(P_\w+?)_", DataProblems())
