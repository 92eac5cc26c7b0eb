"""`backend.address`: the simulation attaches to a Ray cluster it did not start (here one this
test starts with `ray start --head` on loopback and stops by its own process handle)."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import TINY, make_settings
from fedpriv.experiment import run_experiment

#: Ray rewrites 127.0.0.1 to the host's interface address; another loopback address keeps
#: every connection on the loopback interface.
LOOPBACK = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--node-ip-address={LOOPBACK}", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    deadline, seen = time.time() + 120, ""
    while "Ray runtime started" not in seen and time.time() < deadline and head.poll() is None:
        seen += head.stdout.readline()
    assert "Ray runtime started" in seen, seen[-2000:]
    yield f"{LOOPBACK}:{port}", temp_dir, head
    os.killpg(head.pid, signal.SIGTERM)  # this cluster only; never `ray stop`
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_attaches_to_a_running_cluster_and_leaves_it_running(tmp_path, ray_cluster):
    address, temp_dir, head = ray_cluster
    settings = make_settings(
        [*TINY, "backend=ray_cluster", f"backend.address={address}", f"+backend.init_args._node_ip_address={LOOPBACK}"]
    )
    summary = run_experiment(settings, tmp_path)
    assert summary["rounds_completed"] == 2 and summary["privacy"]["max_epsilon"] > 0
    assert head.poll() is None  # the cluster outlives the simulation
    worker_logs = [name for _, _, files in os.walk(temp_dir) for name in files if name.startswith("worker-")]
    assert worker_logs  # the hospitals ran as workers of that cluster, not of a new local one
