"""`backend.address`: the simulation attaches to a Ray cluster it did not start (here the one
the test session starts with `ray start --head` on loopback, conftest.ray_cluster)."""

import os

from conftest import TINY, make_settings
from fedpriv.experiment import run_experiment


def _worker_logs(temp_dir) -> set[str]:
    return {name for _, _, files in os.walk(temp_dir) for name in files if name.startswith("worker-")}


def test_simulation_attaches_to_a_running_cluster_and_leaves_it_running(tmp_path, ray_cluster):
    settings = make_settings([*TINY, "backend=ray_cluster", *ray_cluster.overrides])
    before = _worker_logs(ray_cluster.temp_dir)
    summary = run_experiment(settings, tmp_path)
    assert summary["rounds_completed"] == 2 and summary["privacy"]["max_epsilon"] > 0
    assert ray_cluster.head.poll() is None  # the cluster outlives the simulation
    assert _worker_logs(ray_cluster.temp_dir) - before  # the hospitals ran as new workers of that cluster, not of a new local one
