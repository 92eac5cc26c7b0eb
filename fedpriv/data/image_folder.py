"""Image folders with one sub-folder per class, e.g. the CBIS-DDSM mass patch layout."""

from __future__ import annotations

import re
from pathlib import Path

from fedpriv.data.readers import ReadOptions, is_readable, read_file
from fedpriv.data.records import DataProblems, ImageRecords, SplitData, stack_records
from fedpriv.errors import FedprivError
from fedpriv.settings import external_name


def read_class_folders(
    root: Path,
    class_folders: dict[str, int],
    options: ReadOptions,
    patient_pattern: str,
    problems: DataProblems,
    patients_required: bool = True,
) -> ImageRecords:
    """Read `root/<class folder>/*` (any readable format); the patient id is the first group of
    `patient_pattern` in the file name; `site` is the data set's folder name. Without
    `patients_required` (an external test set, never split or partitioned by patient) a file
    whose name has no patient id is its own patient, and repeated images are not refused."""
    images, labels, patients, metadata = [], [], [], []
    pattern = re.compile(patient_pattern)
    for folder, label in class_folders.items():
        directory = root / folder
        if not directory.is_dir():
            raise FedprivError(f"{directory} is missing: expected one folder per class {sorted(class_folders)}")
        files = sorted(p for p in directory.iterdir() if is_readable(p))
        if not files:
            raise FedprivError(f"{directory} has no images; put the class images there or fix data.root")
        for path in files:
            match = pattern.search(path.name)
            if match is None and patients_required:
                problems.report(f"{path}: no patient id in the file name (data.patient_pattern={patient_pattern!r})")
                continue
            try:
                item = read_file(path, options)
            except FedprivError as error:
                problems.report(str(error))
                continue
            patient = match.group(1) if match else f"{folder}/{path.name}"
            # a repeat in the private data is sampled beyond its accounting; an external test
            # set trains nothing, so its images are only evaluated
            if patients_required and problems.repeated(str(path), patient, item.pixels, path):
                continue
            images.append(item.pixels)
            labels.append(label)
            patients.append(patient)
            metadata.append({"site": root.parent.name, **item.metadata})
    return stack_records(str(root), images, labels, patients, metadata)


def read_split_folders(
    root: Path,
    splits: dict[str, str],
    class_folders: dict[str, int],
    options: ReadOptions,
    patient_pattern: str,
    problems: DataProblems,
    external: tuple[Path, ...] = (),
) -> SplitData:
    """Read the train/val/test folders under root, keeping the given patient-level splits,
    and each `external` test folder (same class folders), keyed by its folder name."""
    if not root.is_dir():
        raise FedprivError(f"data.root={str(root)!r} is not a folder; point data.root at the data set")
    parts = {
        split: read_class_folders(root / folder, class_folders, options, patient_pattern, problems)
        for split, folder in splits.items()
    }
    for folder in external:
        if not folder.is_dir():
            raise FedprivError(f"data.external_test: {str(folder)!r} is not a folder; list folders PATH/<class folder>/<files>")
    tests = {
        external_name(str(folder)): read_class_folders(folder, class_folders, options, patient_pattern, problems, patients_required=False)
        for folder in external
    }
    return SplitData(**parts, skipped=tuple(problems.messages), external=tests)
