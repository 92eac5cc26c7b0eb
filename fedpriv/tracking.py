"""The researcher's experiment tracker (`logger=none | mlflow | tensorboard`): a run's config,
every metrics line (step = round) and the summary (`final/` metrics) go there too, with the
run's provenance. The tracker's package is imported only when it is chosen."""

from __future__ import annotations

import math
import os
import re
import shlex
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpriv.errors import FedprivError
from fedpriv.outputs import json_safe, to_json

if TYPE_CHECKING:
    from fedpriv.settings import LoggerSettings

LOGGERS = ("none", "mlflow", "tensorboard")
#: The module each tracker needs (installed by the `tracking` extra).
TRACKER_MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
#: The MLflow run a run directory reports to, so that a resumed run continues it.
MLFLOW_RUN_FILE = "mlflow_run_id"


def missing_package(logger: str) -> str | None:
    """The package `logger` needs when it is not installed (found without importing it)."""
    module = TRACKER_MODULES.get(logger)
    return module if module is not None and find_spec(module) is None else None


class Tracker:
    """`logger=none`: reports nowhere."""

    def log_round(self, line: dict) -> None:
        """One metrics.jsonl line."""

    def log_summary(self, summary: dict, path: Path) -> None:
        """The summary, and the file `path` it was written to."""

    def close(self, status: str) -> None:
        """`status`: FINISHED, FAILED or KILLED."""


@contextmanager
def tracking(
    logger: LoggerSettings, run_dir: Path, config: dict, provenance: dict, resumed_after: int | None = None
) -> Iterator[Tracker]:
    """The tracker for one run, closed with the run's outcome. `resumed_after`: the round a
    resumed run continues after (0: none was checkpointed); None for a new run."""
    if logger.name == "mlflow":
        tracker: Tracker = MlflowTracker(logger, Path(run_dir), config, provenance, resumed_after)
    elif logger.name == "tensorboard":
        tracker = TensorBoardTracker(Path(run_dir), config, provenance, resumed_after)
    else:
        tracker = Tracker()
    try:
        yield tracker
    except BaseException as error:
        tracker.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    tracker.close("FINISHED")


def _leaves(payload: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path of keys, value) of every non-dict value of a nested dict."""
    for key, value in payload.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, str(key)))
        else:
            yield (*path, str(key)), value


def scalars(payload: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested dict by slash-joined path (`epsilon/0`,
    `fairness/age/worst_group_auroc`); lists, strings, booleans, null, NaN and ∞ are left out.
    Characters trackers refuse in a name are spelt out or become `_` (group `>=65` → `gte65`)."""
    return {
        prefix + "/".join(map(_metric_name, path)): float(value)
        for path, value in _leaves(json_safe(payload))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def _metric_name(key: str) -> str:
    return re.sub(r"[^\w.\- ]", "_", key.replace("<", "lt").replace(">", "gt").replace("=", "e"))


def _strings(payload: dict) -> dict[str, str]:
    """Dot-joined keys, values as text (lists as shell words); null values left out."""
    return {
        ".".join(path): shlex.join(map(str, value)) if isinstance(value, list) else str(value)
        for path, value in _leaves(payload)
        if value is not None
    }


def _round_metrics(line: dict) -> dict[str, float]:
    return scalars({k: v for k, v in line.items() if k != "round"})


def _summary_metrics(summary: dict) -> dict[str, float]:
    """The results (settings and provenance are the config and the tags)."""
    return scalars({k: v for k, v in summary.items() if k not in ("settings", "provenance")}, "final/")


class MlflowTracker(Tracker):
    """One MLflow run in `logger.experiment`: params = the config, tags = the provenance
    (`fedpriv.*`, and MLflow's own source-commit tag), metrics per round, `final/` metrics
    and summary.json as an artifact. The default store is SQLite in the run directory, its
    artifacts in RUN/mlartifacts; a resumed run continues its MLflow run."""

    def __init__(self, logger: LoggerSettings, run_dir: Path, config: dict, provenance: dict, resumed_after: int | None) -> None:
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # its records go through fedpriv's log
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as Flower's: off unless asked for
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        local = logger.tracking_uri is None
        tags = {f"fedpriv.{k}": v for k, v in _strings(provenance).items()} | {"fedpriv.run_dir": str(run_dir.resolve())}
        if provenance.get("git_commit"):
            tags["mlflow.source.git.commit"] = provenance["git_commit"]
        try:
            with warnings.catch_warnings():  # MLflow's SQL store on SQLAlchemy 2.1: its warning, not the user's
                warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated", category=DeprecationWarning)
                self.client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db" if local else logger.tracking_uri)
            id_file = run_dir / MLFLOW_RUN_FILE
            if resumed_after is not None and id_file.is_file():
                self.run_id = id_file.read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                artifacts = (run_dir.resolve() / "mlartifacts").as_uri() if local else None
                self.run_id = self.client.create_run(self._experiment(logger.experiment, artifacts)).info.run_id
                id_file.write_text(self.run_id + "\n")
            params = [Param(k, v) for k, v in _strings(config).items()]
            self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
        except MlflowException as error:
            first = str(error).strip().splitlines()[0]
            raise FedprivError(f"logger=mlflow could not open its run ({first}); check logger.tracking_uri and logger.experiment") from None

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another run of a sweep
            return self.client.get_experiment_by_name(name).experiment_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_round(self, line: dict) -> None:
        self._metrics(_round_metrics(line), line["round"])

    def log_summary(self, summary: dict, path: Path) -> None:
        self._metrics(_summary_metrics(summary), summary["rounds_completed"])
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker(Tracker):
    """Event files in the run directory: scalars per round, `final/` scalars at the last
    round, config and provenance as text. A resumed run drops the events of the rounds it
    redoes (TensorBoard's purge_step) and adds its own config and provenance at the round it
    continues after."""

    def __init__(self, run_dir: Path, config: dict, provenance: dict, resumed_after: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        start = resumed_after or 0
        self.writer = SummaryWriter(str(run_dir), purge_step=None if resumed_after is None else start + 1)
        for name, payload in (("config", config), ("provenance", provenance)):
            self.writer.add_text(name, _code_block(to_json(payload)), global_step=start)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_round(self, line: dict) -> None:
        self._scalars(_round_metrics(line), line["round"])
        self.writer.flush()

    def log_summary(self, summary: dict, path: Path) -> None:
        self._scalars(_summary_metrics(summary), summary["rounds_completed"])

    def close(self, status: str) -> None:
        self.writer.close()


def _code_block(text: str) -> str:
    """Text that TensorBoard's Markdown shows as written."""
    return "\n".join("    " + line for line in text.splitlines())
