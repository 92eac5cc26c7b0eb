"""Spread training patients over hospitals: a patient's images always stay in one hospital.

Every scheme assigns *patients*, never single images. Label and quantity skew reuse
flwr-datasets partitioners on an in-memory table with one row per patient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedpriv.data.records import ImageRecords
from fedpriv.data.splits import patient_labels
from fedpriv.errors import FedprivError
from fedpriv.settings import PartitionSettings

#: (patients, per-patient malignant flag, per-patient metadata, num_clients, settings, seed)
#: → one hospital index per patient.
Partitioner = Callable[[np.ndarray, np.ndarray, dict, int, PartitionSettings, int], np.ndarray]


def iid_patients(patients, malignant, metadata, num_clients, settings, seed) -> np.ndarray:
    """Equal-sized hospitals with the same malignant share (stratified round-robin)."""
    rng = np.random.default_rng(seed)
    hospital = np.empty(len(patients), dtype=np.int64)
    offset = 0
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(malignant == label))
        hospital[members] = (np.arange(len(members)) + offset) % num_clients
        offset += len(members)
    return hospital


def dirichlet_patients(patients, malignant, metadata, num_clients, settings, seed) -> np.ndarray:
    """Label skew: each hospital's malignant share drawn from Dirichlet(α) (flwr-datasets)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=settings.alpha,
        min_partition_size=settings.min_patients,
        self_balancing=False,
        seed=seed,
    )
    try:
        return _assign_with(partitioner, patients, malignant, num_clients)
    except ValueError as error:
        raise FedprivError(
            f"partition=dirichlet could not give every hospital {settings.min_patients} patients "
            f"(partition.alpha={settings.alpha}): raise partition.alpha, lower num_clients or "
            f"partition.min_patients ({error})"
        ) from None


def quantity_patients(patients, malignant, metadata, num_clients, settings, seed) -> np.ndarray:
    """Quantity skew: hospital k gets a share ∝ (k+1)^-power of the patients (at least
    partition.min_patients each), patients shuffled first (flwr-datasets SizePartitioner)."""
    from flwr_datasets.partitioner import SizePartitioner

    n = len(patients)
    spare = n - settings.min_patients * num_clients
    if spare < 0:
        raise FedprivError(
            f"partition=quantity needs {settings.min_patients} patients × {num_clients} hospitals but "
            f"there are {n} training patients; lower num_clients or partition.min_patients"
        )
    weights = (np.arange(1, num_clients + 1, dtype=float)) ** (-settings.power)
    sizes = settings.min_patients + np.floor(spare * weights / weights.sum()).astype(int)
    sizes[0] += n - sizes.sum()
    order = np.random.default_rng(seed).permutation(n)
    shuffled = _assign_with(SizePartitioner(sizes.tolist()), patients[order], malignant[order], num_clients)
    hospital = np.empty(n, dtype=np.int64)
    hospital[order] = shuffled
    return hospital


def by_column_patients(patients, malignant, metadata, num_clients, settings, seed) -> np.ndarray:
    """Natural split: one hospital per value of a metadata column (site, scanner, …)."""
    column = settings.column
    if column not in metadata:
        raise FedprivError(
            f"partition.column={column!r} is not in the data's metadata (has: {sorted(metadata)})"
        )
    values = metadata[column]
    distinct = sorted(set(values.tolist()))
    if len(distinct) != num_clients:
        raise FedprivError(
            f"partition=by_column on {column!r} gives {len(distinct)} hospitals ({distinct[:8]}); "
            f"set num_clients={len(distinct)}"
        )
    lookup = {v: i for i, v in enumerate(distinct)}
    return np.array([lookup[v] for v in values.tolist()], dtype=np.int64)


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid_patients,
    "dirichlet": dirichlet_patients,
    "quantity": quantity_patients,
    "by_column": by_column_patients,
}


def _patient_table(patients: np.ndarray, malignant: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"patient": patients.tolist(), "label": malignant.tolist()})


def _assign_with(partitioner, patients: np.ndarray, malignant: np.ndarray, num_clients: int) -> np.ndarray:
    """Hospital per patient, read back through the partitioner's public load_partition."""
    partitioner.dataset = _patient_table(patients, malignant)
    position = {p: i for i, p in enumerate(patients.tolist())}
    hospital = np.full(len(patients), -1, dtype=np.int64)
    for client in range(num_clients):
        for patient in partitioner.load_partition(client)["patient"]:
            hospital[position[patient]] = client
    return hospital


def _patient_metadata(train: ImageRecords, patients: np.ndarray) -> dict[str, np.ndarray]:
    """One value per patient for each metadata column that is constant within patients."""
    first = {p: i for i, p in reversed(list(enumerate(train.patient_ids)))}
    rows = np.array([first[p] for p in patients])
    result = {}
    for name, column in train.metadata.items():
        per_patient = column[rows]
        lookup = dict(zip(patients, per_patient))
        if all(lookup[p] == v for p, v in zip(train.patient_ids, column)):
            result[name] = per_patient
    return result


def partition_by_patient(
    train: ImageRecords, num_clients: int, settings: PartitionSettings, seed: int
) -> list[np.ndarray]:
    """Row indices of `train` for each hospital, assigned patient by patient."""
    if settings.name not in PARTITIONERS:
        raise FedprivError(f"partition={settings.name!r} is unknown; choose one of {sorted(PARTITIONERS)}")
    patients, malignant = patient_labels(train)
    if not 1 <= num_clients <= len(patients):
        raise FedprivError(
            f"num_clients={num_clients} must be between 1 and the {len(patients)} training "
            "patients; lower num_clients or use more data"
        )
    metadata = _patient_metadata(train, patients)
    hospital_of_patient = PARTITIONERS[settings.name](patients, malignant, metadata, num_clients, settings, seed)
    lookup = dict(zip(patients, hospital_of_patient))
    hospital_of_row = np.array([lookup[p] for p in train.patient_ids])
    shards = [np.flatnonzero(hospital_of_row == c) for c in range(num_clients)]
    empty = [c for c, rows in enumerate(shards) if len(rows) == 0]
    if empty:
        raise FedprivError(f"partition={settings.name} leaves hospital {empty[0]} without patients; lower num_clients")
    return shards


def partition_table(train: ImageRecords, shards: list[np.ndarray]) -> list[dict]:
    """One row per hospital: patients, images, malignant and benign images, malignant share."""
    rows = []
    for client, index in enumerate(shards):
        shard = train.subset(index)
        malignant = int(shard.labels.sum())
        rows.append(
            {
                "hospital": client,
                "patients": int(len(shard.patients)),
                "images": int(len(shard)),
                "malignant": malignant,
                "benign": int(len(shard)) - malignant,
                "malignant_pct": round(100 * shard.malignant_fraction, 1),
            }
        )
    return rows


def hospital_test_patients(
    train: ImageRecords, shards: list[np.ndarray], test: ImageRecords, settings: PartitionSettings, seed: int
) -> np.ndarray:
    """Each test row's hospital ("h<k>"), so that every hospital has test patients of its own.

    `by_column`: the hospital of the same column value ("other" for values no hospital trains
    on). Otherwise test patients are dealt out by label in proportion to each hospital's
    training patients of that label, so a hospital's test set mirrors its size and case mix.
    """
    patients, malignant = patient_labels(test)
    if settings.name == "by_column":
        site_of = {v: f"h{h}" for h, rows in enumerate(shards) for v in train.metadata[settings.column][rows].tolist()}
        return np.array([site_of.get(v, "other") for v in test.metadata[settings.column].tolist()])
    train_patients, train_malignant = patient_labels(train)
    hospital_of = {p: h for h, rows in enumerate(shards) for p in train.patient_ids[rows].tolist()}
    counts = np.zeros((len(shards), 2))
    for patient, label in zip(train_patients.tolist(), train_malignant.tolist()):
        counts[hospital_of[patient], label] += 1
    rng = np.random.default_rng([seed, 4099])
    assigned = {}
    for label in (0, 1):
        members = rng.permutation(patients[malignant == label])
        quotas = _largest_remainder(counts[:, label], len(members))
        for patient, hospital in zip(members.tolist(), np.repeat(np.arange(len(shards)), quotas).tolist()):
            assigned[patient] = f"h{hospital}"
    return np.array([assigned[p] for p in test.patient_ids.tolist()])


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `weights` (Hamilton's method)."""
    if weights.sum() == 0:
        weights = np.ones_like(weights)
    exact = total * weights / weights.sum()
    quotas = np.floor(exact).astype(int)
    quotas[np.argsort(quotas - exact)[: total - quotas.sum()]] += 1
    return quotas
