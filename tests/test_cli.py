"""The `fedpriv` command: installable on current Pythons, Hydra sweeps through it, and a console
that shows fedpriv's lines (one per round, the tables, warnings) while simulate.log keeps all."""

import json
import re
import subprocess
import sys
import tomllib

from conftest import ROOT

#: conftest.TINY with one hospital (centralized) and a δ too large for its ~40 images (a warning).
QUIET_RUN = [
    "data.num_patients=60", "data.images_per_patient=1", "data.image_size=32", "rounds=2", "local_epochs=1",
    "training.batch_size=8", "evaluation.bootstrap=20", "num_clients=1", "privacy.delta=0.05",
]
#: The default run's console must fit on one screen.
SCREEN_LINES = 40


def test_pyproject_declares_the_console_command_and_no_python_cap():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fedpriv"] == "fedpriv.cli:main"
    assert project["requires-python"] == ">=3.11"  # 3.12 and 3.13 users can install it
    from fedpriv.cli import main

    assert main(["--version"]) == 0 and main(["no-such-command"]) == 2


def test_an_installed_wheel_carries_the_configs():
    """`pip install .` (not only -e): the package data covers every config, through the
    fedpriv/configs link to configs/."""
    from fedpriv import CONFIG_DIR

    assert CONFIG_DIR == (ROOT / "configs").resolve() and (ROOT / "fedpriv" / "configs").is_symlink()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fedpriv"]
    assert patterns == ["configs/**/*.yaml"]
    every = sorted(p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml"))
    packaged = sorted(p.relative_to(ROOT / "fedpriv" / "configs") for p in (ROOT / "fedpriv").glob(patterns[0]))
    assert len(every) > 30 and packaged == every


def test_sweep_through_the_command_quiet_console_complete_log_and_verbose(tmp_path):
    """`fedpriv simulate -m verbose=false,true …`: two runs. The quiet one shows the partition,
    one line per round, the summary and fedpriv's warning, and nothing of Flower or Ray;
    the verbose one adds Flower's own lines. Each run's simulate.log has the config, the
    partition, every round, the summary and the warning."""
    command = [sys.executable, "-m", "fedpriv", "simulate", "-m", "verbose=false,true", *QUIET_RUN,
               f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stdout[-3000:]
    quiet, verbose = done.stdout.split("#1 : ")  # Hydra announces each job of the sweep
    assert len(quiet.splitlines()) <= SCREEN_LINES, quiet
    for chatter in ("flwr", "DEBUG", "DEPRECATED", "FutureWarning", "fraction_evaluate", "Ray"):
        assert chatter not in quiet, chatter
    assert re.search(r"^round 1/2 .*AUROC .*@[0-9.]+ .*ε", quiet, re.M) and re.search(r"^round 2/2 ", quiet, re.M)
    assert "privacy.delta=0.05 is not much smaller than 1/n" in quiet and "decision threshold" in quiet
    assert "centralized" in quiet  # num_clients=1 is named as such, not as "central"
    assert "Registered 1 nodes" in verbose  # Flower's DEBUG lines, with verbose=true
    for job in ("0", "1"):
        log = (tmp_path / job / "simulate.log").read_text()
        summary = json.loads((tmp_path / job / "summary.json").read_text())
        assert summary["rounds_completed"] == 2 and summary["num_clients"] == 1
        assert "num_clients: 1" in log and "partition" in log and "summary" in log
        assert "round 1/2" in log and "round 2/2" in log and "privacy.delta=0.05 is not much smaller" in log
        assert log.count("DEPRECATED FEATURE") == 0 and "fraction_evaluate" not in log


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=str(ROOT), COLUMNS="120", PYTHONUNBUFFERED="1")
    return env


def _lines(run_dir) -> list[dict]:
    """A run's metrics lines without its timings."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if "second" not in k} for line in lines]


def test_a_sweep_reuses_its_workers_and_each_run_gives_what_it_gives_alone(tmp_path):
    """The runs of `-m` share one Ray instance and its warm hospital workers (data, priors and
    backbone outputs they built stay cached); each run's rounds, metrics and ε are those of
    the same run started on its own."""
    federation = [*QUIET_RUN, "num_clients=2", "privacy.delta=1e-3"]
    swept = subprocess.run(
        [sys.executable, "-m", "fedpriv", "simulate", "-m", "seed=0,1", *federation, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=_env(),
    )
    assert swept.returncode == 0, swept.stdout[-3000:]
    alone = subprocess.run(
        [sys.executable, "-m", "fedpriv", "simulate", "seed=1", *federation, f"hydra.run.dir={tmp_path / 'alone'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=_env(),
    )
    assert alone.returncode == 0, alone.stdout[-3000:]
    second, single = _lines(tmp_path / "sweep" / "1"), _lines(tmp_path / "alone")
    assert len(second) == 2 and second == single
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path / "sweep" / "1", tmp_path / "alone")]
    assert summaries[0]["test"] == summaries[1]["test"] and summaries[0]["privacy"] == summaries[1]["privacy"]
    assert summaries[0]["privacy"]["max_epsilon"] > 0
