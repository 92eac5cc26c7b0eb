"""MedMNIST-format `.npz` files (e.g. BreastMNIST): `{train,val,test}_{images,labels}` arrays.

MedMNIST carries no patient ids, so each image counts as its own patient; its labels are
mapped to fedpriv's malignant = 1 by `data.labels` (BreastMNIST: 0 = malignant).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedpriv.data.readers import ReadOptions, fit_to_shape, to_unit_range
from fedpriv.data.records import DataProblems, ImageRecords, SplitData
from fedpriv.errors import FedprivError

SPLITS = ("train", "val", "test")


def read_npz(path: Path, labels: dict[str, int], options: ReadOptions, problems: DataProblems) -> SplitData:
    """The three splits; an image that repeats an earlier one (any split: without patient ids
    identical pixels are taken for the same image) is reported to `problems`."""
    if not path.is_file():
        raise FedprivError(f"data.path={str(path)!r} is not a file; point it at the .npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise FedprivError(f"{path} cannot be read as .npz ({error}); replace the file") from None
    parts = {}
    for split in SPLITS:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in arrays]
        if missing:
            raise FedprivError(f"{path} has no array {missing[0]!r} (has {sorted(arrays)}); expected MedMNIST keys")
        records = _records(path, split, arrays[f"{split}_images"], arrays[f"{split}_labels"], labels, options)
        repeats = [problems.repeated(f"{path} {split}_images[{i}]", None, image) for i, image in enumerate(records.images)]
        parts[split] = records.subset(~np.array(repeats, dtype=bool))
    return SplitData(**parts, skipped=tuple(problems.messages))


def _records(path: Path, split: str, images: np.ndarray, raw_labels: np.ndarray, labels: dict[str, int], options: ReadOptions) -> ImageRecords:
    raw_labels = raw_labels.reshape(len(raw_labels), -1)
    if raw_labels.shape[1] != 1 or len(raw_labels) != len(images):
        raise FedprivError(f"{path}: {split}_labels must hold one label per image (shape {raw_labels.shape})")
    raw = [str(int(v)) for v in raw_labels[:, 0]]
    unknown = sorted(set(raw) - set(labels))
    if unknown:
        raise FedprivError(f"{path}: {split}_labels has value {unknown[0]} that is not in data.labels {sorted(labels)}")
    if images.ndim == 4 and images.shape[-1] == 3:  # RGB MedMNIST sets → gray
        images = images @ np.array([0.299, 0.587, 0.114])
    if images.ndim not in (3, 4):
        raise FedprivError(f"{path}: {split}_images has shape {images.shape}; expected N×H×W (2D) or N×D×H×W (3D)")
    window = (127.5, 255.0) if images.dtype == np.uint8 else None
    pixels = np.stack([fit_to_shape(to_unit_range(image.astype(np.float32), window), options) for image in images])
    return ImageRecords(
        images=pixels[:, None].astype(np.float32),
        labels=np.array([labels[v] for v in raw], dtype=np.int64),
        patient_ids=np.array([f"{split}-{i:06d}" for i in range(len(images))]),
    )
