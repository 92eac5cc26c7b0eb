"""The studies in simulations/: every experiment config composes and validates, every
script names an experiment that exists, and (slow) a shrunken study runs end to end."""

import os
import re
import subprocess

import pytest

from conftest import CONFIGS, ROOT, make_settings, write_cbis_like, write_class_folder, CBIS_CLASSES

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
SCRIPTS = sorted(p for p in (ROOT / "simulations").glob("*.sh") if not p.name.startswith("_"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_composes_into_valid_settings(experiment):
    settings = make_settings([f"+experiment={experiment}", "data.root=/data"] if "cbis" in experiment else [f"+experiment={experiment}"])
    if experiment.startswith("fairness"):
        assert settings.audit.name == "mia" and settings.num_clients >= 3
    elif experiment in ("recipe_cbis", "scratch_cbis"):  # the DP recipes: SGD with momentum, q ≈ 0.2 at each of 3 hospitals (1,104 patches)
        assert settings.training.optimizer == "sgd" and settings.training.batch_size / (1104 / 3) == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_study_script_runs_a_known_experiment(script):
    named = re.findall(r"^\s*sweep (\w+) |\+experiment=(\w+)", script.read_text(), flags=re.M)
    assert named and all((n[0] or n[1]) in EXPERIMENTS for n in named)


@pytest.mark.parametrize("setting", ["augment", "pretrain"])
def test_synthetic_study_settings_compose_with_an_accounted_gan(setting):
    settings = make_settings(["+experiment=synthetic_cbis", "data.root=/data", f"synthetic={setting}"])
    assert settings.privacy.delta == 1e-4 and settings.synthetic.name == setting
    assert settings.synthetic.dp and settings.synthetic.generator == "merf"  # the paper's GAN was not private; ours is
    assert settings.synthetic.epsilon_share == 0.5
    assert settings.prior.name == "random_process" and settings.training.freeze == "backbone"  # on top of the recipe


@pytest.mark.slow
def test_fairness_study_runs_shrunken_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"EPSILONS": "4", "SEEDS": "0"}
    tiny = ["data.num_patients=80", "data.image_size=32", "rounds=1", "local_epochs=1", "evaluation.bootstrap=0"]
    proc = subprocess.run(["bash", str(ROOT / "simulations" / "fairness_phantom.sh"), str(tmp_path), *tiny],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| local | 4.000 |" in report and "| none | ∞ |" in report and "auroc_drop~subgroup_size" in report


@pytest.mark.slow
def test_synthetic_study_runs_shrunken_end_to_end_on_cbis(tmp_path, cbis_root):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"EPSILONS": "6", "SEEDS": "0", "SETTINGS": "pretrain"}
    tiny = [f"data.root={cbis_root}", "rounds=1", "local_epochs=1", "evaluation.bootstrap=0", "data.image_size=32",
            "synthetic.generator_steps=5", "synthetic.train_epochs=1", "synthetic.samples_per_class=10"]
    proc = subprocess.run(["bash", str(ROOT / "simulations" / "synthetic_cbis.sh"), str(tmp_path), *tiny],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for setup in ("federated", "central"):
        report = (tmp_path / setup / "report" / "report.md").read_text()
        assert "| pretrain |" in report


def test_recipe_study_smoke_run_writes_the_report_table(tmp_path, ray_cluster):
    """simulations/scratch_cbis.sh shrunk to one ε, one seed, the central part and one ablation,
    1 round, on a written CBIS-like folder with an external test folder: the report has the
    recipe, its non-private reference and the ablation as three rows. Its runs attach to the
    test session's Ray cluster (the script passes its extra overrides to every run)."""
    root = write_cbis_like(tmp_path / "cbis", {"train": 12, "val": 4, "test": 6})
    write_class_folder(tmp_path / "site_x", CBIS_CLASSES, 4, first_patient=500)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"EPSILONS": "6", "SEEDS": "0", "FEDERATIONS": "central", "ABLATIONS": "no_ema", "PYTHONPATH": str(ROOT)}
    tiny = [f"data.root={root}", f"data.external_test=[{tmp_path / 'site_x'}]", "data.image_size=32", "rounds=1",
            "training.augmentations=2", "evaluation.bootstrap=0", *ray_cluster.overrides]
    proc = subprocess.run(["bash", str(ROOT / "simulations" / "scratch_cbis.sh"), str(tmp_path / "out"), *tiny],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| data"))
    assert "external.site_x.auroc" in header and "spent_epsilon" in header
    rows = [line for line in report.splitlines() if line.startswith("| cbis_ddsm")]
    assert len(rows) == 3 and any("| none | ∞ |" in r for r in rows)
    dp = [r for r in rows if "| local | 6.000 |" in r]  # the recipe and its ablation: two settings
    assert len(dp) == 2 and any("no-ema" in r for r in dp) and any("ema=0.6" in r for r in dp)
    assert "## Against published results" in report and "| published: DP-SGD real data (Osuala 2024) | 0.525 |" in report
