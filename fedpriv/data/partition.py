"""Spread training patients over hospitals: a patient's images always stay in one hospital."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedpriv.data.records import ImageRecords
from fedpriv.data.splits import patient_labels
from fedpriv.errors import FedprivError

#: A partitioner maps (patients, per-patient malignant flag, num_clients, rng) to one
#: hospital index per patient.
Partitioner = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], np.ndarray]


def iid_patients(patients, malignant, num_clients, rng) -> np.ndarray:
    """Equal-sized hospitals with the same malignant share (stratified round-robin)."""
    hospital = np.empty(len(patients), dtype=np.int64)
    offset = 0
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(malignant == label))
        hospital[members] = (np.arange(len(members)) + offset) % num_clients
        offset += len(members)
    return hospital


PARTITIONERS: dict[str, Partitioner] = {"iid": iid_patients}


def partition_by_patient(
    train: ImageRecords, num_clients: int, scheme: str, seed: int
) -> list[np.ndarray]:
    """Row indices of `train` for each hospital, assigned patient by patient."""
    if scheme not in PARTITIONERS:
        raise FedprivError(f"partition.name={scheme!r} is unknown; choose one of {sorted(PARTITIONERS)}")
    patients, malignant = patient_labels(train)
    if not 1 <= num_clients <= len(patients):
        raise FedprivError(
            f"num_clients={num_clients} must be between 1 and the {len(patients)} training "
            "patients; lower num_clients or use more data"
        )
    hospital_of_patient = PARTITIONERS[scheme](patients, malignant, num_clients, np.random.default_rng(seed))
    lookup = dict(zip(patients, hospital_of_patient))
    hospital_of_row = np.array([lookup[p] for p in train.patient_ids])
    return [np.flatnonzero(hospital_of_row == c) for c in range(num_clients)]


def partition_table(train: ImageRecords, shards: list[np.ndarray]) -> list[dict]:
    """One row per hospital: patients, images, malignant share."""
    rows = []
    for client, index in enumerate(shards):
        shard = train.subset(index)
        rows.append(
            {
                "hospital": client,
                "patients": int(len(shard.patients)),
                "images": int(len(shard)),
                "malignant_pct": round(100 * shard.malignant_fraction, 1),
            }
        )
    return rows
