"""Kill a run with SIGKILL at any moment, resume it, and get exactly the uninterrupted result."""

import copy
import json
import os
import pickletools
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from omegaconf import OmegaConf

from conftest import ROOT, SAMPLED_LOCAL_CENTRAL, compose_config, make_settings
from fedpriv.checkpoint import Checkpoint
from fedpriv.errors import FedprivError
from fedpriv.experiment import run_experiment
from fedpriv.config import settings_from_config
from fedpriv.settings import changed_settings, run_settings_dict
from fedpriv.simulate import resumed_config

#: Sampling, central noise, a server optimiser and adaptive clipping: every piece of server
#: state a checkpoint must carry (see conftest.SAMPLED_LOCAL_CENTRAL).
RUN = SAMPLED_LOCAL_CENTRAL
TIMING = ("seconds", "train_seconds", "client_seconds")


def _env():
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _simulate(args, stderr=subprocess.PIPE):
    return subprocess.Popen(
        [sys.executable, "-m", "fedpriv.simulate", *args], cwd=ROOT, env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=stderr, text=True,
    )


def _lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _comparable(lines):
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(sampled_local_central_run):
    """The same config run start to finish without a kill (shared with other test files)."""
    return sampled_local_central_run[0]


#: (rounds logged, then seconds); the default suite kills right after round 1's line in
#: test_one_process_writes_a_run_directory_at_a_time.
KILL_POINTS = [(1, 0.0), (0, 3.0), (1, 0.8), (1, 2.5), (2, 0.0), (2, 1.2)]


def _start_and_wait_for(run_dir, lines):
    proc = _simulate([*RUN, f"hydra.run.dir={run_dir}"])
    deadline = time.time() + 600
    while len(_lines(run_dir)) < lines and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc


def _spent(run_dir):
    return {p.name: json.loads(p.read_text())["spent"] for p in (run_dir / "hospitals").glob("*.json")}


@pytest.mark.slow
@pytest.mark.parametrize("after_lines, delay", KILL_POINTS)
def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_result(tmp_path, uninterrupted, after_lines, delay):
    run_dir = tmp_path / "run"
    proc = _start_and_wait_for(run_dir, after_lines)
    time.sleep(delay)  # 0: right after a round's line (checkpoint may lag); >0: mid-round
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray processes, everything
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "killed too late to test anything"
    killed_at = len(_lines(run_dir))
    spent_before = _spent(run_dir)

    resumed = _simulate([f"resume={run_dir}"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    _assert_uninterrupted_result(run_dir, uninterrupted)
    for name, before in spent_before.items():  # nothing spent before the kill was forgotten
        after = json.loads((run_dir / "hospitals" / name).read_text())["spent"]
        assert after[: len(before)] == before
    assert killed_at <= 3
    log = (run_dir / "simulate.log").read_text()  # the resumed run logs into the run's own simulate.log too
    assert log.count(f"run directory {run_dir}; config:") == 2 and "round 3/3" in log


def test_one_process_writes_a_run_directory_at_a_time(tmp_path, uninterrupted):
    """A resume started while the run still holds its directory, then (the run killed) two
    resumes at once: one writes, the others stop with one line naming its pid — no round
    twice in metrics.jsonl, no release a hospital's record lacks, the uninterrupted result."""
    run_dir = tmp_path / "run"
    original = _start_and_wait_for(run_dir, 1)
    os.killpg(original.pid, signal.SIGSTOP)  # alive, holding the directory, going nowhere
    try:
        intruder = _simulate([f"resume={run_dir}"])
        assert intruder.wait(timeout=300) == 2
        _assert_refused_by(intruder.stderr.read(), original.pid)
    finally:
        os.killpg(original.pid, signal.SIGKILL)
        original.wait()
    assert not (run_dir / "summary.json").exists(), "killed too late to test anything"

    logs = [open(tmp_path / f"resume{i}.log", "w+") for i in range(2)]
    both = [_simulate([f"resume={run_dir}"], stderr=log) for log in logs]
    codes = [proc.wait(timeout=600) for proc in both]
    assert sorted(codes) == [0, 2], [log.seek(0) or log.read()[-3000:] for log in logs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    logs[loser].seek(0)
    _assert_refused_by(logs[loser].read(), both[winner].pid)
    _assert_uninterrupted_result(run_dir, uninterrupted)


def _assert_refused_by(stderr, pid):
    errors = [line for line in stderr.splitlines() if line.startswith("fedpriv:")]
    assert len(errors) == 1 and f"another fedpriv run (pid {pid})" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr


def _assert_uninterrupted_result(run_dir, uninterrupted):
    whole = json.loads((uninterrupted / "summary.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"] == whole["test"] and summary["test_ci95"] == whole["test_ci95"]
    assert summary["privacy"] == whole["privacy"]  # the same ε, record- and client-level
    assert _comparable(_lines(run_dir)) == _comparable(_lines(uninterrupted))
    assert json.loads((run_dir / "ledger.json").read_text()) == json.loads((uninterrupted / "ledger.json").read_text())


def test_a_run_saved_before_a_setting_existed_resumes_while_that_setting_keeps_its_default():
    settings = make_settings(RUN)
    saved = copy.deepcopy(run_settings_dict(settings))
    del saved["evaluation"]["tta"]  # a run that predates evaluation.tta behaved as its default
    assert changed_settings(settings, saved) == []
    assert changed_settings(make_settings([*RUN, "evaluation.tta=true"]), saved) == ["evaluation.tta"]
    assert changed_settings(make_settings([*RUN, "seed=5"]), saved) == ["seed"]
    assert changed_settings(make_settings([*RUN, "training.lr=0.5"]), run_settings_dict(settings)) == ["training.lr"]


def test_a_run_whose_config_predates_a_settings_group_resumes_with_its_default(tmp_path):
    old = OmegaConf.to_container(compose_config(RUN))
    del old["logger"]  # a group added after that run started
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    resumed = settings_from_config(resumed_config(compose_config([f"resume={tmp_path}"]), [f"resume={tmp_path}"]))
    assert resumed.logger == make_settings(RUN).logger and resumed.resume == str(tmp_path)
    assert changed_settings(resumed, run_settings_dict(make_settings(RUN))) == []


def test_resume_refuses_another_config_and_a_finished_run(tmp_path, uninterrupted):
    settings = make_settings([*RUN, f"resume={uninterrupted}"])
    with pytest.raises(FedprivError, match="already finished"):
        run_experiment(settings, uninterrupted)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes((uninterrupted / "checkpoint.pt").read_bytes())
    other = make_settings([*RUN, "seed=5", f"resume={partial}"])
    with pytest.raises(FedprivError, match="differs from the run being resumed in 'seed'"):
        run_experiment(other, partial)
    with pytest.raises(FedprivError, match="already holds a run"):
        run_experiment(make_settings(RUN), uninterrupted)


def _pickled_classes(path) -> set[str]:
    """The module of every class or function a torch file's pickle names."""
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg.split()[0] for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}


def test_a_checkpoint_holds_tensors_and_plain_data_only(uninterrupted, tmp_path):
    path = uninterrupted / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)  # refuses any class but tensors and plain containers
    assert {module.split(".")[0] for module in _pickled_classes(path)} <= {"torch", "collections"}  # no flwr, numpy, …
    strategy = payload["strategy"]  # FedYogi under adaptive clipping: its moments and its clipping norm
    assert sorted(strategy) == ["clipping_norm", "m_t", "v_t"] and isinstance(strategy["clipping_norm"], float)
    assert all(isinstance(v, torch.Tensor) for moments in (strategy["m_t"], strategy["v_t"]) for v in moments.values())
    assert Checkpoint.load(uninterrupted).round == 3
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({**payload, "strategy": Checkpoint}, pickled / "checkpoint.pt")  # a file naming a class
    with pytest.raises(FedprivError, match="holds more than tensors and plain data"):
        Checkpoint.load(pickled)
