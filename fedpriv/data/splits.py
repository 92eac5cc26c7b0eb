"""Patient-level train/val/test splits, stratified by each patient's label."""

from __future__ import annotations

import numpy as np

from fedpriv.data.records import ImageRecords, SplitData


def patient_labels(records: ImageRecords) -> tuple[np.ndarray, np.ndarray]:
    """Distinct patients and, per patient, 1 if any of their images is malignant."""
    patients, inverse = np.unique(records.patient_ids, return_inverse=True)
    malignant = np.zeros(len(patients), dtype=np.int64)
    np.maximum.at(malignant, inverse, records.labels)
    return patients, malignant


def split_by_patient(
    records: ImageRecords, val_fraction: float, test_fraction: float, seed: int
) -> SplitData:
    """Assign whole patients to train/val/test, keeping the malignant share in each."""
    patients, malignant = patient_labels(records)
    rng = np.random.default_rng(seed)
    split_of = {}
    for label in (0, 1):
        group = rng.permutation(patients[malignant == label])
        n_test = int(round(len(group) * test_fraction))
        n_val = int(round(len(group) * val_fraction))
        for i, patient in enumerate(group):
            split_of[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    assigned = np.array([split_of[p] for p in records.patient_ids])
    return SplitData(
        train=records.subset(assigned == "train"),
        val=records.subset(assigned == "val"),
        test=records.subset(assigned == "test"),
    )
