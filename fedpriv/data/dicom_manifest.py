"""A manifest CSV (`data=manifest`) from a folder of DICOM files and a CSV of labels.

Every DICOM image under the folder (any depth, with or without a .dcm suffix) becomes one
row: its path, its patient (the PatientID tag, or the part of it `patient_pattern` picks),
laterality and view from the tags, and the label the labels CSV gives it. The labels CSV is
keyed by its columns named after DICOM keywords (e.g. `PatientID`, `StudyInstanceUID`,
`SOPInstanceUID`, `AccessionNumber`; several at once, e.g. `PatientID,ImageLaterality` for
labels per breast; PatientID is matched against the patient id, after `patient_pattern`) or
by `file` (a path relative to the folder, or a bare file name); its
`label` column holds the label and every other column (e.g. `split`, `age`) is copied into
the manifest.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError

from fedpriv.errors import FedprivError

#: The labels-CSV column that names a file instead of a DICOM tag.
FILE_KEY = "file"
#: Columns every manifest row gets (then the labels CSV's extra columns).
MANIFEST_COLUMNS = ("path", "label", "patient_id", "laterality", "view", "study_uid", "sop_instance_uid")


@dataclass
class ManifestResult:
    """What `build_manifest` wrote, and every file it left out with the reason."""

    rows: list[dict[str, str]] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)  # DICOM images the labels CSV has no label for
    skipped: list[str] = field(default_factory=list)  # "path: reason" (not DICOM, no image, PatientID unmatched)
    without_patient: int = 0  # rows written with an empty patient_id (no PatientID tag)

    @property
    def patients(self) -> int:
        return len({row["patient_id"] for row in self.rows if row["patient_id"]})


def build_manifest(
    dicom_dir: Path,
    labels_csv: Path,
    out: Path,
    label_column: str = "label",
    patient_pattern: str | None = None,
) -> ManifestResult:
    """Scan `dicom_dir`, label each image from `labels_csv`, write the manifest CSV to `out`
    (paths relative to its folder, so `data.root` can stay null)."""
    dicom_dir, out = Path(dicom_dir), Path(out)
    if not dicom_dir.is_dir():
        raise FedprivError(f"{dicom_dir} is not a folder; give the folder that holds the DICOM files")
    keys, labels = read_labels(Path(labels_csv), label_column)
    pattern = re.compile(patient_pattern) if patient_pattern else None
    result = ManifestResult()
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(dicom_dir).as_posix()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            result.skipped.append(f"{relative}: not a DICOM file")
            continue
        if "Rows" not in ds:  # DICOMDIR, structured reports, presentation states: no image
            result.skipped.append(f"{relative}: holds no image")
            continue
        patient = _tag(ds, "PatientID")
        if pattern is not None and patient:
            match = pattern.search(patient)
            if match is None:
                result.skipped.append(f"{relative}: PatientID {patient!r} does not match --patient-pattern")
                continue
            patient = match.group(1)
        if not patient:  # fine for an external test set; a training manifest stops on it
            result.without_patient += 1
        # a `file` key: the path relative to the folder, or else the bare file name
        tags = {k: patient if k == "PatientID" else _tag(ds, k) for k in keys if k != FILE_KEY}
        candidates = [tuple(name if k == FILE_KEY else tags[k] for k in keys) for name in (relative, path.name)]
        key = next((k for k in candidates if k in labels), None)
        if key is None:
            result.unlabelled.append(relative)
            continue
        row = {
            "path": _manifest_path(path, out),
            "patient_id": patient,
            "laterality": _tag(ds, "ImageLaterality") or _tag(ds, "Laterality"),
            "view": _tag(ds, "ViewPosition"),
            "study_uid": _tag(ds, "StudyInstanceUID"),
            "sop_instance_uid": _tag(ds, "SOPInstanceUID"),
        }
        row.update(labels[key])  # label, and the labels CSV's other columns
        result.rows.append(row)
    if not result.rows:
        raise FedprivError(
            f"no DICOM image under {dicom_dir} has a label in {labels_csv} (keyed by {', '.join(keys)}; "
            f"{len(result.unlabelled)} unlabelled, {len(result.skipped)} skipped); check the key column's values"
        )
    columns = list(dict.fromkeys([*MANIFEST_COLUMNS, *(c for row in result.rows for c in row)]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.rows)
    return result


def read_labels(labels_csv: Path, label_column: str) -> tuple[tuple[str, ...], dict[tuple[str, ...], dict[str, str]]]:
    """The key columns (DICOM keywords and/or `file`) and, per key, the label and extra columns."""
    if not labels_csv.is_file():
        raise FedprivError(f"--labels {labels_csv} is not a file; give the CSV of labels")
    with labels_csv.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        lines = list(reader)
    if label_column not in header:
        raise FedprivError(f"--labels {labels_csv} has no column {label_column!r} (columns: {header}); add it or pass --label-column")
    keys = tuple(name for name in header if name == FILE_KEY or tag_for_keyword(name) is not None)
    if not keys:
        raise FedprivError(
            f"--labels {labels_csv}: no key column; name one after a DICOM keyword (PatientID, StudyInstanceUID, "
            f"SOPInstanceUID, AccessionNumber, ...) or call it {FILE_KEY!r} (paths relative to the DICOM folder)"
        )
    labels: dict[tuple[str, ...], dict[str, str]] = {}
    for number, line in enumerate(lines, start=2):
        line = {k.strip(): (v or "").strip() for k, v in line.items() if k is not None}
        key = tuple(line[k] for k in keys)
        values = {k: v for k, v in line.items() if k not in keys}
        values["label"] = values.pop(label_column)
        if not values["label"]:
            raise FedprivError(f"--labels {labels_csv} line {number}: empty {label_column!r}")
        if key in labels and labels[key] != values:
            raise FedprivError(
                f"--labels {labels_csv} line {number}: {dict(zip(keys, key))} is listed twice with different values; "
                "keep one line per key (add ImageLaterality or SOPInstanceUID to the key for labels per breast or image)"
            )
        labels[key] = values
    return keys, labels


def _tag(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _manifest_path(path: Path, out: Path) -> str:
    """Relative to the manifest's folder when the file lies under it (the pair can move
    together), else absolute."""
    path, base = path.resolve(), out.resolve().parent
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
