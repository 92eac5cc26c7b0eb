"""Federations of hundreds of hospitals: data built once per process, no per-hospital work
each round, per-hospital test subgroups capped, and the device each hospital trains on."""

import json
import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.server.superlink.fleet.vce import vce_api

import fedpriv.client as client
from conftest import TINY, make_settings
from fedpriv.data.partition import partition_by_patient
from fedpriv.data.sources import load_splits
from fedpriv.devices import backend_device, choose_device
from fedpriv.errors import FedprivError
from fedpriv.experiment import prepare, run_experiment
from fedpriv.federation import RoundOutcome
from fedpriv.internals import nodes_with_undelivered_messages
from fedpriv.outputs import RunDirectory
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.server import initial_weights, run_rounds

MANY = ["data.num_patients=400", "num_clients=100", "strategy.clients_per_round=10"]


@pytest.mark.parametrize(
    "num_gpus, cuda, expected", [(0.0, False, "cpu"), (0.0, True, "cpu"), (0.5, False, "cpu"), (0.25, True, "cuda"), (1.0, True, "cuda")]
)
def test_a_hospital_trains_on_cuda_only_when_it_asks_for_a_gpu_and_one_is_there(num_gpus, cuda, expected):
    assert choose_device(num_gpus, cuda).type == expected


def test_without_cuda_a_gpu_request_falls_back_to_the_cpu_and_says_so(caplog):
    settings = make_settings([*TINY, "backend.client_resources.num_gpus=0.5"])
    with caplog.at_level(logging.WARNING):
        device = backend_device(settings.backend)
    if torch.cuda.is_available():
        assert device.type == "cuda"
    else:
        assert device.type == "cpu" and "num_gpus=0.5" in caplog.text
    assert backend_device(make_settings(TINY).backend).type == "cpu"  # the default: no GPU asked for


def test_a_worker_builds_the_data_once_for_all_its_hospitals(tmp_path, monkeypatch):
    settings = make_settings([*TINY, *MANY])
    calls = []

    def counting_load_splits(data, seed):
        calls.append(seed)
        return load_splits(data, seed)

    monkeypatch.setattr(client, "load_splits", counting_load_splits)
    client.federation_rows.cache_clear()
    client.hospital_shard.cache_clear()
    trainer = client.HospitalTrainer(settings, str(tmp_path))
    facts = [trainer.describe(h) for h in range(settings.num_clients)]
    shards = [client.hospital_shard(settings, h) for h in (0, 57, 99, 0)]
    assert len(calls) == 1  # one data load for 100 hospitals, not one per hospital
    train = load_splits(settings.data, settings.seed).train  # what each hospital used to rebuild
    rows = partition_by_patient(train, settings.num_clients, settings.partition, settings.seed)
    for h, shard in zip((0, 57, 99), shards):
        assert np.array_equal(shard.images, train.images[rows[h]]) and list(shard.patient_ids) == list(train.patient_ids[rows[h]])
    assert sum(f["num_examples"] for f in facts) == len(train)
    assert facts[57]["num_patients"] == len(set(train.patient_ids[rows[57]]))
    client.federation_rows.cache_clear()
    client.hospital_shard.cache_clear()


def test_per_hospital_test_subgroups_only_up_to_the_configured_number_of_hospitals():
    few = prepare(make_settings([*TINY, "num_clients=3", "evaluation.max_hospital_subgroups=3"]))
    assert set(few.splits.test.metadata["hospital"]) <= {"h0", "h1", "h2"}
    assert all("test_images" in row for row in few.table)
    many = prepare(make_settings([*TINY, "num_clients=4", "evaluation.max_hospital_subgroups=3"]))
    assert "hospital" not in many.splits.test.metadata and all("test_images" not in row for row in many.table)


def test_a_negative_subgroup_cap_is_refused_naming_the_key():
    with pytest.raises(FedprivError, match="evaluation.max_hospital_subgroups=-1"):
        make_settings([*TINY, "evaluation.max_hospital_subgroups=-1"])


class FakeFederation:
    """Stands in for the Flower federation: 100 hospitals, 10 trained per round, hospital 3
    fails in round 1; records which hospitals the server queries."""

    def __init__(self, num_hospitals: int, weights: dict) -> None:
        self.num_hospitals, self.weights, self.queries, self.strategy = num_hospitals, weights, [], None

    def describe_hospitals(self, hospitals=None):
        asked = list(range(self.num_hospitals)) if hospitals is None else sorted(hospitals)
        self.queries.append(asked)
        return {h: {"num_examples": 4} for h in asked}

    def train_round(self, server_round, weights, config):
        sampled = np.random.default_rng(server_round).choice(self.num_hospitals, 10, replace=False).tolist()
        outcome = RoundOutcome(weights=self.weights)
        for h in sampled:
            outcome.trained[h] = {"num-examples": 4, "train_loss": 0.5, "seconds": 0.01}
        if server_round == 1:
            outcome.trained.pop(3, None)
            outcome.failed[3] = "injected"
        return outcome


def test_after_discovery_the_server_asks_only_hospitals_that_failed(tmp_path):
    settings = make_settings([*TINY, *MANY, "privacy=none", "rounds=3"])
    federation = FakeFederation(settings.num_clients, initial_weights(settings))
    splits = load_splits(settings.data, settings.seed)
    lines, _, _ = run_rounds(federation, settings, splits, RunDirectory(tmp_path), PrivacyLedger(delta=0.0), lambda line: None)
    assert len(lines) == 3
    assert federation.queries == [list(range(100)), [3]]  # discovery once, then only the failed one


def test_a_hundred_hospitals_ten_per_round_run_end_to_end(tmp_path, ray_cluster):
    settings = make_settings([*TINY, *MANY, "rounds=2", "evaluation.bootstrap=0", *ray_cluster.overrides])
    summary = run_experiment(settings, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [len(line["hospitals_trained"]) for line in lines] == [10, 10]
    assert "hospital" not in summary["fairness"] and len(summary["partition"]) == 100  # 100 > the default cap of 20
    hospitals = summary["privacy"]["hospitals"]
    trained = {h for line in lines for h in line["hospitals_trained"]}
    assert len(hospitals) == 100 and {int(h) for h, v in hospitals.items() if v["epsilon"] > 0} == trained
    assert all(0 < v["epsilon"] <= 8.0 for h, v in hospitals.items() if int(h) in trained)
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__  # Flower's own again after the run


def test_the_engine_asks_only_hospitals_with_an_undelivered_message_in_flowers_order(flower_task):
    """The message sweep that replaces Flower's (which asks all 1000 hospitals every 0.1 s)."""
    def message(node: int, delivered: bool) -> Message:
        msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
        msg.metadata.delivered_at = "2026-01-01T00:00:00" if delivered else ""
        return msg

    store = {str(i): message(node, delivered) for i, (node, delivered) in enumerate([(7, False), (3, True), (5, False), (7, False)])}
    state = SimpleNamespace(message_ins_store=store, lock=threading.RLock())
    nodes_mapping = {9: 0, 7: 1, 5: 2, 3: 3, 1: 4}  # node id → partition, Flower's iteration order
    assert nodes_with_undelivered_messages(state, nodes_mapping) == [7, 5]
    assert nodes_with_undelivered_messages(SimpleNamespace(), nodes_mapping) == [9, 7, 5, 3, 1]  # another LinkState


@pytest.mark.slow
def test_a_thousand_hospitals_ten_per_round_run_end_to_end(tmp_path):
    settings = make_settings(
        [*TINY, "data.num_patients=3000", "num_clients=1000", "strategy.clients_per_round=10", "rounds=2", "evaluation.bootstrap=0"]
    )
    summary = run_experiment(settings, tmp_path)
    assert summary["rounds_completed"] == 2 and len(summary["privacy"]["hospitals"]) == 1000
    assert sum(v["epsilon"] > 0 for v in summary["privacy"]["hospitals"].values()) <= 20
