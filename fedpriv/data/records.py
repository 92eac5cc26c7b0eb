"""In-memory image records: image, label, patient id and metadata, kept column-wise."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpriv.errors import FedprivError

#: Label convention used everywhere: malignant is the positive class.
MALIGNANT, BENIGN = 1, 0


@dataclass
class ImageRecords:
    """N images (float32, N×C×H×W, values in [0, 1]) with labels, patients and metadata."""

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    metadata: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        columns = {"labels": self.labels, "patient_ids": self.patient_ids, **self.metadata}
        for name, column in columns.items():
            if len(column) != n:
                raise ValueError(f"column {name!r} has {len(column)} rows, images have {n}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> ImageRecords:
        """Rows selected by an integer index or boolean mask."""
        return ImageRecords(
            images=self.images[index],
            labels=self.labels[index],
            patient_ids=self.patient_ids[index],
            metadata={k: v[index] for k, v in self.metadata.items()},
        )

    @property
    def patients(self) -> np.ndarray:
        """Distinct patient ids, sorted."""
        return np.unique(self.patient_ids)

    @property
    def malignant_fraction(self) -> float:
        return float(np.mean(self.labels == MALIGNANT)) if len(self) else float("nan")


@dataclass
class DataProblems:
    """Unreadable, inconsistent or repeated items met while loading.

    Strict (the default for runs): the first problem stops the run with its message.
    Collecting (`data.skip_unreadable=true`, and `fedpriv.data check`): each problem is kept,
    the item is left out, and the count and messages go into the run's summary.
    """

    collect: bool = False
    messages: list[str] = field(default_factory=list)
    seen: dict[tuple, str] = field(default_factory=dict)  # an image's identities → where it was first met

    def report(self, message: str) -> None:
        if not self.collect:
            raise FedprivError(message)
        self.messages.append(message)

    def repeated(self, where: str, patient: str | None, pixels: np.ndarray, path: Path | None = None) -> bool:
        """Whether this image was met before in the data set — the same file (path, link or
        hard link) or, for the same patient, the same pixels (patient None: a source without
        patient ids, any earlier image) — and if so report it, naming both places: an image
        listed twice is sampled twice as often as its privacy is accounted for. `where` names
        the item; a new image is remembered under it."""
        identities = {}
        if path is not None:
            stat = path.stat()
            identities[("file", stat.st_dev, stat.st_ino)] = "the same file"
        identities[("pixels", patient, hashlib.sha256(pixels.tobytes()).hexdigest())] = "the same pixels"
        for identity, why in identities.items():
            if identity in self.seen:
                self.report(
                    f"{where} repeats {self.seen[identity]} ({why}{'' if patient is None else f', patient {patient}'}): a repeated image is "
                    "sampled more often than its privacy is accounted for; list each image once"
                )
                return True
        self.seen.update(dict.fromkeys(identities, where))
        return False


@dataclass
class SplitData:
    """Train/val/test records; no patient appears in two of them. `skipped` lists the
    items a lenient load left out (see DataProblems); `external` holds extra test sets by
    name (data.external_test), evaluated and reported separately."""

    train: ImageRecords
    val: ImageRecords
    test: ImageRecords
    skipped: tuple[str, ...] = ()
    external: dict[str, ImageRecords] = field(default_factory=dict)

    @property
    def parts(self) -> dict[str, ImageRecords]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def check_disjoint_patients(self, source: str) -> None:
        parts = self.parts
        names = list(parts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared = np.intersect1d(parts[a].patients, parts[b].patients)
                if len(shared):
                    raise FedprivError(
                        f"{source}: patient {shared[0]} is in both the {a} and {b} split "
                        f"({len(shared)} shared patients); splits must be by patient"
                    )


def stack_records(
    source: str,
    images: list[np.ndarray],
    labels: list[int],
    patient_ids: list[str],
    metadata: list[dict],
) -> ImageRecords:
    """ImageRecords from per-item lists; a metadata field becomes a column only when every
    item has it (files differ in which tags they carry)."""
    if not images:
        raise FedprivError(f"{source}: no readable images")
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        raise FedprivError(f"{source} mixes images of shapes {shapes} (2D images and 3D volumes?); use one kind per data set")
    shared = set.intersection(*(set(m) for m in metadata)) if metadata else set()
    return ImageRecords(
        images=np.stack(images),
        labels=np.array(labels, dtype=np.int64),
        patient_ids=np.array(patient_ids).astype(str),
        metadata={name: np.array([m[name] for m in metadata]) for name in sorted(shared)},
    )


def concat_records(parts: list[ImageRecords]) -> ImageRecords:
    """Rows of several record sets, one after another (metadata columns they all have)."""
    shared = set.intersection(*(set(p.metadata) for p in parts))
    return ImageRecords(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        patient_ids=np.concatenate([p.patient_ids for p in parts]),
        metadata={k: np.concatenate([p.metadata[k] for p in parts]) for k in sorted(shared)},
    )
