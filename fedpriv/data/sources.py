"""Data sources by name (`data.source`): each returns patient-level train/val/test splits."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from fedpriv.data.image_folder import read_split_folders
from fedpriv.data.manifest import manifest_splits
from fedpriv.data.npz import read_npz
from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.data.phantom_ct import PhantomCTSpec, generate_phantom_ct
from fedpriv.data.readers import ReadOptions
from fedpriv.data.records import DataProblems, SplitData
from fedpriv.data.splits import split_by_patient
from fedpriv.settings import (
    DataSettings,
    FileDataSettings,
    FolderDataSettings,
    ManifestDataSettings,
    NpzDataSettings,
    PhantomDataSettings,
)


def _phantom_mammo(settings: PhantomDataSettings, seed: int, problems: DataProblems) -> SplitData:
    spec = PhantomSpec(
        num_patients=settings.num_patients,
        images_per_patient=settings.images_per_patient,
        image_size=settings.image_size,
        num_sites=settings.num_sites,
        malignant_fraction=settings.malignant_fraction,
        class_separation=settings.class_separation,
        noise_level=settings.noise_level,
    )
    return split_by_patient(generate_phantom_mammo(spec, seed), settings.val_fraction, settings.test_fraction, seed)


def _phantom_ct(settings: PhantomDataSettings, seed: int, problems: DataProblems) -> SplitData:
    spec = PhantomCTSpec(
        num_patients=settings.num_patients,
        volume_size=settings.image_size,
        num_sites=settings.num_sites,
        malignant_fraction=settings.malignant_fraction,
        class_separation=settings.class_separation,
        noise_level=settings.noise_level,
    )
    return split_by_patient(generate_phantom_ct(spec, seed), settings.val_fraction, settings.test_fraction, seed)


def read_options(settings: FileDataSettings | NpzDataSettings) -> ReadOptions:
    window = getattr(settings, "window", None)
    return ReadOptions(settings.image_size, tuple(window) if window else None, settings.volume_fit)


def _image_folder(settings: FolderDataSettings, seed: int, problems: DataProblems) -> SplitData:
    return read_split_folders(
        Path(settings.root).expanduser(),
        dict(settings.splits),
        dict(settings.class_folders),
        read_options(settings),
        settings.patient_pattern,
        problems,
        tuple(Path(path).expanduser() for path in settings.external_test),
    )


def _manifest(settings: ManifestDataSettings, seed: int, problems: DataProblems) -> SplitData:
    return manifest_splits(
        Path(settings.manifest).expanduser(),
        Path(settings.root).expanduser() if settings.root else None,
        dict(settings.columns),
        {str(k): v for k, v in settings.labels},
        read_options(settings),
        settings.val_fraction,
        settings.test_fraction,
        seed,
        problems,
        tuple(Path(path).expanduser() for path in settings.external_test),
    )


def _npz(settings: NpzDataSettings, seed: int, problems: DataProblems) -> SplitData:
    return read_npz(Path(settings.path).expanduser(), {str(k): v for k, v in settings.labels}, read_options(settings), problems)


SOURCES: dict[str, Callable[[DataSettings, int, DataProblems], SplitData]] = {
    "phantom_mammo": _phantom_mammo,
    "phantom_ct": _phantom_ct,
    "image_folder": _image_folder,
    "manifest": _manifest,
    "npz": _npz,
}


@functools.lru_cache(maxsize=4)
def load_splits(settings: DataSettings, seed: int) -> SplitData:
    """Load (once per process) the train/val/test records that `data=` describes; bad items
    stop the load unless `data.skip_unreadable=true`."""
    problems = DataProblems(collect=getattr(settings, "skip_unreadable", False))
    return SOURCES[settings.source](settings, seed, problems)
