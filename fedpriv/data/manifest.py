"""A manifest CSV: one row per image file, with its label, patient and any metadata.

Required columns (names configurable via `data.columns`): path (relative to `data.root`, or
to the CSV's folder), label, patient_id; optional: split (train/val/test). Every other
column is metadata (numeric columns become numbers, so age can be binned).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedpriv.data.readers import ReadOptions, read_file
from fedpriv.data.records import DataProblems, ImageRecords, SplitData, stack_records
from fedpriv.data.splits import split_by_patient
from fedpriv.errors import FedprivError
from fedpriv.settings import external_name

REQUIRED = ("path", "label", "patient_id")
SPLITS = ("train", "val", "test")


def read_manifest(
    manifest: Path,
    root: Path | None,
    columns: dict[str, str],
    labels: dict[str, int],
    options: ReadOptions,
    problems: DataProblems,
    patients_required: bool = True,
) -> tuple[ImageRecords, np.ndarray | None]:
    """All readable rows as records, and each row's split (None when the CSV has no split
    column). Rows that cannot be used are reported to `problems` with their line number.
    Without `patients_required` (an external test set) the patient_id column may be missing
    or empty: such a row is its own patient."""
    rows = _read_rows(manifest, columns, REQUIRED if patients_required else ("path", "label"))
    base = root if root is not None else manifest.parent
    images, classes, patients, metadata, splits = [], [], [], [], []
    mapped = set(columns.values())
    for line, row in rows:
        where = f"{manifest} line {line}"
        raw_label = row[columns["label"]].strip()
        if raw_label not in labels:
            problems.report(f"{where}: label {raw_label!r} is not one of data.labels {sorted(labels)}; fix the row or data.labels")
            continue
        patient = (row.get(columns["patient_id"]) or "").strip()
        if not patient and patients_required:
            problems.report(f"{where}: empty {columns['patient_id']!r}; every image needs its patient id")
            continue
        split = row.get(columns.get("split", ""), "").strip() if columns.get("split") in row else None
        if split is not None and split not in SPLITS:
            problems.report(f"{where}: split {split!r} must be one of {SPLITS}")
            continue
        path = Path(row[columns["path"]].strip()).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            item = read_file(path, options)
        except FedprivError as error:
            problems.report(f"{where}: {error}")
            continue
        if patients_required and problems.repeated(where, patient, item.pixels, path):
            continue  # (an external test set trains nothing: its repeats are only evaluated)
        images.append(item.pixels)
        classes.append(labels[raw_label])
        patients.append(patient or f"{manifest.name} line {line}")
        extra = {k: v.strip() for k, v in row.items() if k not in mapped}
        metadata.append({**item.metadata, **extra})
        splits.append(split)
    records = stack_records(str(manifest), images, classes, patients, metadata)
    records.metadata = {name: _numeric_if_possible(column) for name, column in records.metadata.items()}
    has_split = bool(splits) and splits[0] is not None
    return records, np.array(splits) if has_split else None


def manifest_splits(
    manifest: Path,
    root: Path | None,
    columns: dict[str, str],
    labels: dict[str, int],
    options: ReadOptions,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    problems: DataProblems,
    external: tuple[Path, ...] = (),
) -> SplitData:
    """The CSV's own splits when it has a split column; otherwise a stratified split by patient.
    Each `external` manifest (same columns; patient ids optional, split ignored) is an extra
    test set, keyed by its file name without .csv."""
    records, split_of = read_manifest(manifest, root, columns, labels, options, problems)
    if split_of is None:
        data = split_by_patient(records, val_fraction, test_fraction, seed)
    else:
        data = SplitData(*(records.subset(split_of == name) for name in SPLITS))
        for name, part in data.parts.items():
            if len(part) == 0:
                raise FedprivError(f"{manifest}: no rows with split {name!r}; every split needs images")
    data.external = {
        external_name(str(path)): read_manifest(path, root, columns, labels, options, problems, patients_required=False)[0]
        for path in external
    }
    data.skipped = tuple(problems.messages)
    return data


def _read_rows(manifest: Path, columns: dict[str, str], required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not manifest.is_file():
        raise FedprivError(f"data.manifest or data.external_test: {str(manifest)!r} is not a file; point it at the CSV")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [key for key in required if columns.get(key) not in header]
        if missing:
            raise FedprivError(
                f"{manifest} has no column {columns.get(missing[0])!r} (columns: {header}); add it or map it with "
                f"data.columns.{missing[0]}=<your column>"
            )
        rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
    broken = [line for line, row in rows if None in row or None in row.values()]
    if broken:
        raise FedprivError(f"{manifest} line {broken[0]} has a different number of fields than the header")
    if not rows:
        raise FedprivError(f"{manifest} has a header but no rows")
    return rows


def _numeric_if_possible(column: np.ndarray) -> np.ndarray:
    try:
        return column.astype(np.float64)
    except ValueError:
        return column
