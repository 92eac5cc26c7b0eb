"""Data sources by name (the `data=` config group): each returns patient-level splits."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from fedpriv.data.image_folder import read_split_folders
from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.data.records import SplitData
from fedpriv.data.splits import split_by_patient
from fedpriv.settings import DataSettings, FolderDataSettings, PhantomDataSettings


def _phantom(settings: PhantomDataSettings, seed: int) -> SplitData:
    spec = PhantomSpec(
        num_patients=settings.num_patients,
        images_per_patient=settings.images_per_patient,
        image_size=settings.image_size,
        num_sites=settings.num_sites,
        malignant_fraction=settings.malignant_fraction,
        class_separation=settings.class_separation,
        noise_level=settings.noise_level,
    )
    records = generate_phantom_mammo(spec, seed)
    return split_by_patient(records, settings.val_fraction, settings.test_fraction, seed)


def _folders(settings: FolderDataSettings, seed: int) -> SplitData:
    return read_split_folders(
        Path(settings.root).expanduser(),
        dict(settings.splits),
        dict(settings.class_folders),
        settings.image_size,
        settings.patient_pattern,
    )


SOURCES: dict[str, Callable[[DataSettings, int], SplitData]] = {
    "phantom_mammo": _phantom,
    "cbis_ddsm": _folders,
}


@functools.lru_cache(maxsize=4)
def load_splits(settings: DataSettings, seed: int) -> SplitData:
    """Load (once per process) the train/val/test records that `data=` describes."""
    return SOURCES[settings.name](settings, seed)
