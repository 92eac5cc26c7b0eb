"""Image folders with one sub-folder per class, e.g. the CBIS-DDSM mass patch layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedpriv.data.records import ImageRecords, SplitData
from fedpriv.errors import FedprivError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_class_folder_split(
    root: Path, class_folders: dict[str, int], image_size: int, patient_pattern: str
) -> ImageRecords:
    """Read `root/<class folder>/*` as grayscale images resized to image_size."""
    images, labels, patients = [], [], []
    pattern = re.compile(patient_pattern)
    for folder, label in class_folders.items():
        directory = root / folder
        if not directory.is_dir():
            raise FedprivError(f"{directory} is missing: expected one folder per class {sorted(class_folders)}")
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FedprivError(f"{directory} has no images; put the class images there or fix data.root")
        for path in files:
            match = pattern.search(path.name)
            if match is None:
                raise FedprivError(
                    f"{path}: no patient id in the file name (data.patient_pattern={patient_pattern!r})"
                )
            images.append(_read_grayscale(path, image_size))
            labels.append(label)
            patients.append(match.group(1))
    return ImageRecords(
        images=np.stack(images)[:, None],
        labels=np.array(labels, dtype=np.int64),
        patient_ids=np.array(patients),
        metadata={"site": np.array([root.parent.name] * len(labels))},
    )


def read_split_folders(
    root: Path, splits: dict[str, str], class_folders: dict[str, int], image_size: int, patient_pattern: str
) -> SplitData:
    """Read the train/val/test folders under root, keeping the given patient-level splits."""
    if not root.is_dir():
        raise FedprivError(f"data.root={str(root)!r} is not a folder; point data.root at the data set")
    parts = {
        split: read_class_folder_split(root / folder, class_folders, image_size, patient_pattern)
        for split, folder in splits.items()
    }
    data = SplitData(**parts)
    data.check_disjoint_patients(f"data.root={root}")
    return data


def _read_grayscale(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise FedprivError(f"{path} cannot be read as an image ({error}); remove or replace the file") from None
