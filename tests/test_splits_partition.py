import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from fedpriv.data.partition import PARTITIONERS, hospital_test_patients, partition_by_patient, partition_table
from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.data.records import ImageRecords, SplitData
from fedpriv.data.splits import split_by_patient
from fedpriv.errors import FedprivError
from fedpriv.settings import PartitionSettings

IID = PartitionSettings("iid")


@pytest.fixture(scope="module")
def records():
    spec = PhantomSpec(300, 2, 16, 4, 0.4, 2.5, 1.0)
    return generate_phantom_mammo(spec, 0)


def test_split_is_by_patient_and_keeps_malignant_share(records):
    split = split_by_patient(records, 0.2, 0.2, seed=0)
    parts = [split.train, split.val, split.test]
    assert sum(len(p) for p in parts) == len(records)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(parts[i].patients) & set(parts[j].patients)
    assert abs(len(split.test.patients) - 60) <= 2 and abs(len(split.val.patients) - 60) <= 2
    for part in parts:
        assert abs(part.malignant_fraction - records.malignant_fraction) < 0.06
    split.check_disjoint_patients("test")


def test_split_depends_on_seed_only(records):
    a, b, c = (split_by_patient(records, 0.2, 0.2, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.test.patient_ids, b.test.patient_ids)
    assert not np.array_equal(a.test.patient_ids, c.test.patient_ids)


def test_shared_patient_across_splits_is_refused(records):
    split = SplitData(records.subset(np.arange(10)), records.subset(np.arange(8, 20)), records.subset(np.arange(20, 30)))
    with pytest.raises(FedprivError, match="both the train and val split"):
        split.check_disjoint_patients("data=x")


@pytest.mark.parametrize("num_clients", [1, 3, 4, 7])
def test_iid_partition_assigns_every_patient_to_exactly_one_hospital(records, num_clients):
    shards = partition_by_patient(records, num_clients, IID, seed=0)
    rows = np.concatenate(shards)
    assert sorted(rows) == list(range(len(records)))
    owner = {}
    for hospital, index in enumerate(shards):
        for patient in records.patient_ids[index]:
            assert owner.setdefault(patient, hospital) == hospital
    sizes = [len(set(records.patient_ids[s])) for s in shards]
    assert max(sizes) - min(sizes) <= 2
    table = partition_table(records, shards)
    assert [r["images"] for r in table] == [len(s) for s in shards]
    if num_clients > 1:
        shares = [r["malignant_pct"] for r in table]
        assert max(shares) - min(shares) < 12


def test_more_hospitals_than_patients_is_refused(records):
    with pytest.raises(FedprivError, match="num_clients=301"):
        partition_by_patient(records, 301, IID, seed=0)
    with pytest.raises(FedprivError, match="num_clients=0"):
        partition_by_patient(records, 0, IID, seed=0)


def test_records_reject_ragged_columns():
    with pytest.raises(ValueError, match="labels"):
        ImageRecords(np.zeros((3, 1, 4, 4), np.float32), np.zeros(2), np.array(["a", "b", "c"]))


def _owner_by_patient(records, shards):
    owner = {}
    for hospital, index in enumerate(shards):
        for patient in records.patient_ids[index]:
            assert owner.setdefault(patient, hospital) == hospital, "a patient is in two hospitals"
    assert len(owner) == len(records.patients)
    return owner


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha(records):
    def spread(alpha):
        shares = []
        for seed in range(3):
            shards = partition_by_patient(records, 4, PartitionSettings("dirichlet", alpha=alpha, min_patients=5), seed)
            _owner_by_patient(records, shards)
            shares += [r["malignant_pct"] for r in partition_table(records, shards)]
        return np.std(shares)

    assert spread(0.2) > spread(100.0) + 5


def test_dirichlet_that_cannot_meet_min_patients_names_the_fix(records):
    impossible = PartitionSettings("dirichlet", alpha=0.5, min_patients=100)
    with pytest.raises(FedprivError, match="partition.alpha"):
        partition_by_patient(records, 4, impossible, seed=0)


def test_quantity_skew_sizes_follow_the_power_law(records):
    shards = partition_by_patient(records, 4, PartitionSettings("quantity", power=1.0, min_patients=5), seed=0)
    owner = _owner_by_patient(records, shards)
    sizes = [list(owner.values()).count(h) for h in range(4)]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= 5
    assert sizes[0] > 2 * sizes[3]
    flat = partition_by_patient(records, 4, PartitionSettings("quantity", power=0.0, min_patients=5), seed=0)
    flat_sizes = [len(set(records.patient_ids[s])) for s in flat]
    assert max(flat_sizes) - min(flat_sizes) <= 1


def test_by_column_gives_one_hospital_per_site(records):
    shards = partition_by_patient(records, 4, PartitionSettings("by_column", column="site"), seed=0)
    _owner_by_patient(records, shards)
    for index in shards:
        assert len(set(records.metadata["site"][index])) == 1
    with pytest.raises(FedprivError, match="set num_clients=4"):
        partition_by_patient(records, 3, PartitionSettings("by_column", column="site"), seed=0)
    with pytest.raises(FedprivError, match="partition.column='scanner'"):
        partition_by_patient(records, 4, PartitionSettings("by_column", column="scanner"), seed=0)


# --- property tests: patient integrity of every partitioner --------------------------------




def _random_records(seed: int, patients: int, sites: int) -> ImageRecords:
    rng = np.random.default_rng(seed)
    views = rng.integers(1, 4, patients)  # 1–3 images per patient
    patient_of = np.repeat(np.arange(patients), views)
    return ImageRecords(
        images=np.zeros((len(patient_of), 1, 4, 4), np.float32),
        labels=(rng.random(patients) < rng.uniform(0.2, 0.8)).astype(np.int64)[patient_of],
        patient_ids=np.array([f"P{p:04d}" for p in patient_of]),
        metadata={"site": np.array([f"s{s}" for s in rng.integers(0, sites, patients)])[patient_of]},
    )


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(sorted(PARTITIONERS)),
    seed=st.integers(0, 10_000),
    patients=st.integers(5, 120),
    clients=st.integers(1, 8),
    alpha=st.floats(0.05, 100),
    power=st.floats(0, 3),
)
def test_every_partitioner_keeps_each_patient_in_exactly_one_hospital(scheme, seed, patients, clients, alpha, power):
    records = _random_records(seed, patients, sites=min(clients, 3))
    if scheme == "by_column":
        clients = len(set(records.metadata["site"]))
    settings = PartitionSettings(name=scheme, alpha=alpha, power=power, column="site", min_patients=1)
    try:
        shards = partition_by_patient(records, clients, settings, seed)
    except FedprivError:
        return  # e.g. more hospitals than patients, or a Dirichlet draw that cannot be met
    rows = np.concatenate(shards)
    assert len(shards) == clients and sorted(rows.tolist()) == list(range(len(records)))  # every image once
    owner = {}
    for hospital, index in enumerate(shards):
        assert len(index) > 0
        for patient in set(records.patient_ids[index].tolist()):
            assert owner.setdefault(patient, hospital) == hospital  # never in two hospitals
    test = _random_records(seed + 1, max(patients // 3, 2), sites=min(clients, 3))
    own = hospital_test_patients(records, shards, test, settings, seed)
    by_patient = {}
    for patient, hospital in zip(test.patient_ids.tolist(), own.tolist()):
        assert by_patient.setdefault(patient, hospital) == hospital  # test patients too
