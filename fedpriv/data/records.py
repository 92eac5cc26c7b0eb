"""In-memory image records: image, label, patient id and metadata, kept column-wise."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
class SplitData:
    """Train/val/test records; no patient appears in two of them."""

    train: ImageRecords
    val: ImageRecords
    test: ImageRecords

    def check_disjoint_patients(self, source: str) -> None:
        from fedpriv.errors import FedprivError

        parts = {"train": self.train, "val": self.val, "test": self.test}
        names = list(parts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared = np.intersect1d(parts[a].patients, parts[b].patients)
                if len(shared):
                    raise FedprivError(
                        f"{source}: patient {shared[0]} is in both the {a} and {b} split "
                        f"({len(shared)} shared patients); splits must be by patient"
                    )
