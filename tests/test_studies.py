"""The studies in simulations/: every experiment config composes and validates, every
script names an experiment that exists, and (slow) a shrunken study runs end to end."""

import os
import re
import subprocess

import pytest

from conftest import CONFIGS, ROOT, make_settings

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
SCRIPTS = sorted(p for p in (ROOT / "simulations").glob("*.sh") if not p.name.startswith("_"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_composes_into_valid_settings(experiment):
    settings = make_settings([f"+experiment={experiment}", "data.root=/data"] if "cbis" in experiment else [f"+experiment={experiment}"])
    assert settings.audit.name == "mia" and settings.num_clients >= 3


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_study_script_runs_a_known_experiment(script):
    named = re.findall(r"^sweep (\w+) ", script.read_text(), flags=re.M)
    assert named and named[0] in EXPERIMENTS


@pytest.mark.slow
def test_fairness_study_runs_shrunken_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"EPSILONS": "4", "SEEDS": "0"}
    tiny = ["data.num_patients=80", "data.image_size=32", "rounds=1", "local_epochs=1", "evaluation.bootstrap=0"]
    proc = subprocess.run(["bash", str(ROOT / "simulations" / "fairness_phantom.sh"), str(tmp_path), *tiny],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| local | 4.000 |" in report and "| none | ∞ |" in report and "auroc_drop~subgroup_size" in report
