"""fedpriv as a Flower App (fedpriv.flower_app): `flwr run` composes the run `fedpriv
simulate` runs and gives the same metrics, ε and model for the same seed."""

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import validate_config
from omegaconf import OmegaConf

from conftest import ROOT, SAMPLED_LOCAL_CENTRAL, TINY, compose_config, make_settings
from fedpriv.errors import FedprivError
from fedpriv.flower_app import hospitals_of, run_of

TIMING = ("seconds", "train_seconds", "client_seconds")


def test_pyproject_is_a_valid_flower_app_whose_bundle_finds_its_configs(tmp_path):
    import tomllib

    valid, errors, _ = validate_config(tomllib.loads((ROOT / "pyproject.toml").read_text()), True, ROOT)
    assert valid and not errors
    # the bundle Flower ships to the SuperLink: no links in it, so no fedpriv/configs
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        fab.extractall(tmp_path)
    assert (tmp_path / "fedpriv" / "flower_app.py").is_file() and not (tmp_path / "fedpriv" / "configs").exists()
    found = subprocess.run(
        [sys.executable, "-c", "from fedpriv import CONFIG_DIR; print(CONFIG_DIR)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, check=True,
    )
    assert Path(found.stdout.strip()) == (tmp_path / "configs").resolve()
    assert (tmp_path / "configs" / "simulate.yaml").is_file()


def test_run_config_composes_the_config_fedpriv_simulate_composes(tmp_path):
    cfg, run_dir = run_of({"overrides": shlex.join(TINY), "run-dir": ""}, 42)
    assert cfg == compose_config(TINY)
    assert run_dir == Path("outputs/flwr/42").resolve()
    _, given = run_of({"overrides": "", "run-dir": str(tmp_path / "here")}, 42)
    assert given == tmp_path / "here"
    with pytest.raises(FedprivError, match="num_clientz is not a setting; did you mean num_clients"):
        run_of({"overrides": "num_clientz=3", "run-dir": ""}, 1)


def test_resume_continues_the_run_directory_with_its_own_config(tmp_path):
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(compose_config([*TINY, "seed=7"]), tmp_path / ".hydra" / "config.yaml")
    cfg, run_dir = run_of({"overrides": f"resume={tmp_path}", "run-dir": ""}, 1)
    assert run_dir == tmp_path and cfg.seed == 7 and cfg.resume == str(tmp_path)
    with pytest.raises(FedprivError, match="leave run-dir empty"):
        run_of({"overrides": f"resume={tmp_path}", "run-dir": str(tmp_path)}, 1)


def _context(num_partitions: int, overrides: list[str]) -> Context:
    node_config = {"partition-id": 0, "num-partitions": num_partitions}
    return Context(7, 1, node_config, RecordDict(), {"overrides": shlex.join(overrides), "run-dir": "outputs/x"})


def test_a_federation_without_one_node_per_hospital_is_refused_by_its_nodes():
    trainer = hospitals_of(_context(2, TINY))  # TINY: num_clients=2
    assert trainer.settings.num_clients == 2 and trainer.state_dir == str(Path("outputs/x/hospitals").resolve())
    with pytest.raises(FedprivError, match="num_clients=2 but the federation has 3 nodes.*num-supernodes=2"):
        hospitals_of(_context(3, TINY))


def test_too_few_nodes_stop_the_run_naming_num_clients(tmp_path, monkeypatch, ray_cluster):
    """Flower waits for nodes forever; fedpriv for DISCOVERY_TIMEOUT (here 2 s), then names
    the setting. On Flower's simulation engine: num_clients=2, one node."""
    from fedpriv import federation
    from fedpriv.client import HospitalTrainer
    from fedpriv.experiment import run_strategy

    monkeypatch.setattr(federation, "DISCOVERY_TIMEOUT", 2.0)
    settings = make_settings([*TINY, *ray_cluster.overrides])
    server = federation.build_server_app(lambda f: f.describe_hospitals(), run_strategy(settings), 2, 60.0, False, settings.seed)
    client = federation.build_client_app(lambda context: HospitalTrainer(settings, str(tmp_path)))
    with pytest.raises(FedprivError, match=r"only [01] of num_clients=2 hospitals connected within 2 s.*num-supernodes=2"):
        federation.run_federation(server, client, 1, settings.backend)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(flwr_home: Path) -> dict[int, str]:
    """pid → command line of every process started under this FLWR_HOME (all inherit it: the
    local SuperLink `flwr run` starts, its SuperExec, the run's process, Ray's)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if f"FLWR_HOME={flwr_home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ValueError, OSError):
            continue
    return found


def _stop(flwr_home: Path) -> None:
    """Let the run's process stop Ray (it ends just after the streamed log), then end the
    SuperLink and everything else started under this FLWR_HOME."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any("flwr-simulation" in c for c in _processes_of(flwr_home).values()):
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_of(flwr_home):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _processes_of(flwr_home):
            time.sleep(0.5)


def flwr_run(overrides: list[str], run_dir: Path, federation_config: str, flwr_home: Path) -> str:
    """`flwr run ROOT --stream` on a local SuperLink of its own (own FLWR_HOME and ports),
    stopped afterwards; returns the streamed output."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # flwr starts flower-superlink from PATH
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # this environment, as fedpriv simulate
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    run_config = f"overrides={json.dumps(shlex.join(overrides))} run-dir={json.dumps(str(run_dir))}"
    command = [str(bin_dir / "flwr"), "run", str(ROOT), "--stream", "--run-config", run_config, "--federation-config", federation_config]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        _stop(flwr_home)
    assert not _processes_of(flwr_home), "a process of the local SuperLink is still running"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_flwr_run_gives_the_run_fedpriv_simulate_gives(tmp_path, sampled_local_central_run):
    """Slow (~2 min: Flower starts a SuperLink, then the simulation). The shared run with
    sampling, record- and client-level DP and FedYogi, under `flwr run`: the same metrics,
    ledger, ε and weights, bit for bit. Flower's Ray gets what the fedpriv run's had: 4
    nodes, 1 CPU each, 2 CPUs in all (+backend.init_args.num_cpus=2)."""
    simulated_dir, simulated = sampled_local_central_run
    run_dir = tmp_path / "run"
    output = flwr_run(
        SAMPLED_LOCAL_CENTRAL, run_dir, "num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2", tmp_path / "flwr"
    )
    assert (run_dir / "summary.json").is_file(), output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    simulated_summary = json.loads((simulated_dir / "summary.json").read_text())
    assert _comparable(summary) == _comparable(simulated_summary)
    # Flower runs the app from its bundle (not a git checkout), under its own command line,
    # whose session token is not written down.
    assert summary["provenance"]["git_commit"] is None
    assert summary["provenance"]["overrides"] == SAMPLED_LOCAL_CENTRAL
    command = summary["provenance"]["command"]
    assert "--token" in command and command[command.index("--token") + 1] == "<redacted>"
    assert summary["privacy"]["max_epsilon"] == simulated["privacy"]["max_epsilon"] > 0
    assert _lines(run_dir) == _lines(simulated_dir)
    assert json.loads((run_dir / "ledger.json").read_text()) == json.loads((simulated_dir / "ledger.json").read_text())
    ours, theirs = torch.load(run_dir / "model.pt"), torch.load(simulated_dir / "model.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert sorted(p.name for p in (run_dir / "hospitals").glob("*.json")) == [f"hospital_{h}.json" for h in range(4)]
    assert "round 3/3" in output and "round 3/3" in (run_dir / "simulate.log").read_text()
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml") == compose_config(SAMPLED_LOCAL_CENTRAL)  # resume reads it


def _comparable(summary: dict) -> dict:
    """The summary without what differs between any two runs (wall time) or between the two
    ways of starting one (the code's location, the command line, and the overrides, which the
    in-process run is not given)."""
    provenance = {k: v for k, v in summary["provenance"].items() if k not in ("git_commit", "git_dirty", "command", "overrides")}
    return {**{k: v for k, v in summary.items() if k != "wall_seconds"}, "provenance": provenance}


def _lines(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
