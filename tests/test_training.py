"""Local training pieces run in-process: determinism and FedProx's proximal pull."""

import torch

from conftest import TINY, make_settings
from fedpriv.client import HospitalTrainer
from fedpriv.server import initial_weights


def _distance(a, b):
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def test_same_seed_same_round_gives_identical_weights_and_epsilon():
    settings = make_settings(TINY)
    start = initial_weights(settings)
    first = HospitalTrainer(settings)(1, start, {"server-round": 1}, {})
    second = HospitalTrainer(settings)(1, start, {"server-round": 1}, {})
    assert all(torch.equal(first[0][k], second[0][k]) for k in start)
    assert first[1]["epsilon"] == second[1]["epsilon"] and first[2] == second[2]


def test_proximal_pull_keeps_local_weights_near_the_global_model():
    settings = make_settings([*TINY, "privacy=none", "training.lr=0.01"])
    start = initial_weights(settings)
    trainer = HospitalTrainer(settings)
    free, _, _ = trainer(0, start, {"server-round": 1}, {})
    pulled, _, _ = trainer(0, start, {"server-round": 1, "proximal-mu": 50.0}, {})
    assert _distance(pulled, start) < 0.8 * _distance(free, start)
