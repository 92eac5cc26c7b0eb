"""logger=mlflow | tensorboard: a real run's config, rounds and summary reach the tracker's own
store and read back as summary.json and metrics.jsonl hold them (slow: a run each; the default
suite drives the real trackers directly, resumes included); provenance in summary.json."""

import json
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException

import fedpriv
from conftest import CENTRAL_BASELINE, ROOT, TINY, compose_config, make_settings
from fedpriv.errors import FedprivError
from fedpriv.experiment import run_experiment
from fedpriv.outputs import to_json
from fedpriv.provenance import PACKAGES, config_digest, git_state, provenance, redacted
from fedpriv.settings import config_error
from fedpriv.tracking import MLFLOW_RUN_FILE, scalars, tracking

#: TINY, with ε accounted every round (privacy=local) and no bootstrap (not what is tested).
RUN = [*TINY, "evaluation.bootstrap=0"]


def _tracked_run(tmp_path_factory, logger: list[str]):
    """(run directory, summary, metrics lines) of RUN reported to `logger`."""
    overrides = [*RUN, *logger]
    run_dir = tmp_path_factory.mktemp(logger[0].split("=")[1])
    summary = run_experiment(make_settings(overrides), run_dir, overrides=overrides)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, lines


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    return _tracked_run(tmp_path_factory, ["logger=tensorboard"])


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    return _tracked_run(tmp_path_factory, ["logger=mlflow", "logger.experiment=tiny"])


#: What each round line and the summary must show in the tracker (ε included).
ROUND_KEYS = ("auroc", "val_auroc", "sensitivity", "train_loss", "max_epsilon", "epsilon/0", "epsilon/1")
FINAL_KEYS = ("final/test/auroc", "final/val/auroc", "final/privacy/max_epsilon", "final/privacy/hospitals/1/epsilon")


def _expected(summary: dict, lines: list[dict]) -> dict[str, dict[int, float]]:
    """Metric name → {step: value} as summary.json and metrics.jsonl hold them."""
    wanted = {key: {} for key in (*ROUND_KEYS, *FINAL_KEYS)}
    for line in lines:
        for key, value in scalars(line).items():
            if key in wanted:
                wanted[key][line["round"]] = value
    for key, value in scalars(summary, "final/").items():
        if key in wanted:
            wanted[key][summary["rounds_completed"]] = value
    assert all(wanted.values()) and summary["privacy"]["max_epsilon"] > 0
    return wanted


def _tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _tensorboard_texts(run_dir) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {tag.split("/")[0]: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}


def _mlflow(run_dir):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    return client, client.get_run((run_dir / MLFLOW_RUN_FILE).read_text().strip())


@pytest.mark.slow  # a run of its own: ~45 s on 2 busy cores
def test_tensorboard_holds_every_round_and_the_summary(tensorboard_run):
    run_dir, summary, lines = tensorboard_run
    stored = _tensorboard_scalars(run_dir)
    for key, values in _expected(summary, lines).items():
        assert stored[key] == pytest.approx(values, rel=1e-6), key  # float32 in the event file
    assert sorted(stored["auroc"]) == [1, 2] and "round" not in stored
    texts = _tensorboard_texts(run_dir)
    assert summary["provenance"]["config_digest"] in texts["provenance"]
    assert json.loads(texts["config"].replace("\n    ", "\n"))["privacy"]["target_epsilon"] == summary["settings"]["privacy"]["target_epsilon"]


@pytest.mark.slow  # a run of its own: ~50 s on 2 busy cores
def test_mlflow_holds_config_rounds_summary_and_provenance(mlflow_run):
    run_dir, summary, lines = mlflow_run
    client, run = _mlflow(run_dir)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "tiny"
    for key, values in _expected(summary, lines).items():
        history = client.get_metric_history(run.info.run_id, key)
        assert {m.step: m.value for m in history} == pytest.approx(values, rel=1e-12), key
    params, tags = run.data.params, run.data.tags
    assert params["privacy.target_epsilon"] == str(summary["settings"]["privacy"]["target_epsilon"])
    assert params["data.num_patients"] == "60" and not any(k.startswith(("logger", "verbose", "resume")) for k in params)
    origin = summary["provenance"]
    assert tags["fedpriv.config_digest"] == origin["config_digest"] and tags["fedpriv.packages.opacus"] == origin["packages"]["opacus"]
    assert tags["fedpriv.overrides"] == " ".join(RUN + ["logger=mlflow", "logger.experiment=tiny"])
    if origin["git_commit"]:
        assert tags["mlflow.source.git.commit"] == tags["fedpriv.git_commit"] == origin["git_commit"]
    artifact = client.download_artifacts(run.info.run_id, "summary.json", str(run_dir / "downloaded"))
    assert json.loads(open(artifact).read()) == json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "mlartifacts").is_dir()  # the default store keeps its artifacts in the run directory


def test_summary_provenance_names_what_produced_the_run(central_baseline_run):
    run_dir, _ = central_baseline_run  # conftest.CENTRAL_BASELINE, run by run_experiment (no Hydra overrides)
    written = json.loads((run_dir / "summary.json").read_text())  # strict JSON (no NaN, no Infinity)
    origin = written["provenance"]
    assert origin == json.loads(to_json(provenance(make_settings(CENTRAL_BASELINE))))
    assert origin["fedpriv_version"] == fedpriv.__version__ and set(origin["packages"]) == set(PACKAGES)
    assert all(re.fullmatch(r"\d+\.\d+.*", v) for v in origin["packages"].values())
    assert origin["python"] == platform.python_version() and origin["overrides"] is None
    assert origin["command"][1:] == sys.orig_argv[1:] and "/" not in origin["command"][0]  # the interpreter by name only
    hostname = socket.gethostname()
    assert origin["platform"] == platform.platform() and (len(hostname) < 4 or hostname not in json.dumps(origin))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert origin["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)


def test_a_token_on_the_command_line_is_never_written_down():
    argv = ["flwr-simulation", "--token", "s3cret", "--insecure", "--api-key=abc", "--tokens", "x"]
    assert redacted(argv) == ["flwr-simulation", "--token", "<redacted>", "--insecure", "--api-key=<redacted>", "--tokens", "x"]


def test_config_digest_covers_what_shapes_results_and_nothing_else():
    digest = config_digest(make_settings(RUN))
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert config_digest(make_settings([*RUN, "logger=mlflow", "verbose=true"])) == digest
    assert config_digest(make_settings([*RUN, "seed=1"])) != digest
    assert config_digest(make_settings([*RUN, "privacy.target_epsilon=3"])) != digest


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True, capture_output=True)


def test_git_state_is_the_checkouts_commit_and_tracked_changes_only(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "summary.json").write_text("{}")  # a run's outputs do not make it dirty
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": True}
    (tmp_path / "pkg").mkdir()  # a folder inside someone else's repository is no checkout of its own
    assert git_state(tmp_path / "pkg") == {"git_commit": None, "git_dirty": None}
    assert git_state(tmp_path.parent / "nowhere") == {"git_commit": None, "git_dirty": None}


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_resumed_run_continues_the_trackers_record_and_replaces_redone_rounds(tmp_path, logger):
    """A run killed after logging round 3 but checkpointing round 1, resumed: rounds 2 and 3
    are the resumed run's values, in the same MLflow run / TensorBoard folder."""
    settings = make_settings([f"logger={logger}"]).logger
    with pytest.raises(KeyboardInterrupt), tracking(settings, tmp_path, {"seed": 0}, {"python": "3"}) as tracker:
        for r in (1, 2, 3):
            tracker.log_round({"round": r, "auroc": 0.1 * r})
        raise KeyboardInterrupt
    with tracking(settings, tmp_path, {"seed": 0}, {"python": "3"}, resumed_after=1) as tracker:
        for r in (2, 3):
            tracker.log_round({"round": r, "auroc": 0.5 + 0.1 * r})
    expected = {1: 0.1, 2: 0.7, 3: 0.8}
    if logger == "tensorboard":
        assert _tensorboard_scalars(tmp_path)["auroc"] == pytest.approx(expected)
    else:
        client, run = _mlflow(tmp_path)
        assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
        latest = {}
        for m in sorted(client.get_metric_history(run.info.run_id, "auroc"), key=lambda m: m.timestamp):
            latest[m.step] = m.value
        assert latest == pytest.approx(expected)


def test_metric_names_are_ones_trackers_accept():
    line = {"round": 1, "released": True, "epsilon": {"0": 1.5}, "max_epsilon": float("inf"), "auroc": float("nan"),
            "fairness": {"age": {"groups": {"<50": {"auroc": 0.7}, ">=65": {"n": 3}}}}, "hospitals_trained": [0, 1]}
    assert scalars(line) == {"round": 1.0, "epsilon/0": 1.5, "fairness/age/groups/lt50/auroc": 0.7, "fairness/age/groups/gte65/n": 3.0}


def test_unknown_or_unavailable_logger_is_refused_in_one_line(monkeypatch):
    try:
        compose_config(["logger=wandb"])
    except HydraException as error:
        assert str(config_error(error)) == "logger=wandb is not an option of logger; choose one of mlflow, none, tensorboard"
    else:
        pytest.fail("composed")
    with pytest.raises(FedprivError, match=r"^logger='wandb' is unknown; choose one of"):
        make_settings(["logger.name=wandb"])
    with pytest.raises(FedprivError, match=r"^logger\.tracking_uri is a setting of logger=mlflow only"):
        make_settings(["logger=tensorboard", "+logger.tracking_uri=file:/x"])
    import fedpriv.tracking

    monkeypatch.setattr(fedpriv.tracking, "find_spec", lambda name: None)  # as if the extra were not installed
    with pytest.raises(FedprivError, match=re.escape("logger=mlflow needs the mlflow package, which is not installed: pip install 'fedpriv[tracking]'")):
        make_settings(["logger=mlflow"])
    assert make_settings([]).logger.name == "none"


def test_a_store_mlflow_cannot_use_is_refused_in_one_line(tmp_path):
    logger = make_settings(["logger=mlflow", "logger.tracking_uri=foo://x"]).logger
    with pytest.raises(FedprivError, match=r"^logger=mlflow could not open its run \(.*'foo://x'.*check logger\.tracking_uri"):
        with tracking(logger, tmp_path, {}, {}):
            pytest.fail("opened")
