"""The run directory: metrics.jsonl, summary.json, partition table, weights and plots."""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedpriv.errors import FedprivError

#: The file whose OS lock marks the one process writing a run directory (it holds its pid).
LOCK_FILE = "run.lock"


def _clean(value):
    """JSON has no NaN or infinity: undefined metrics are written as null, an infinite one
    (e.g. ε without DP) as the string "inf" (Python's float() reads it back)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class RunDirectory:
    """Writes one run's outputs; `summary.json` is written last, only by a finished run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def exclusive(self) -> Iterator[RunDirectory]:
        """Hold the directory for this process: an OS lock (flock) that the OS drops when the
        process ends, however it ends, so a killed run can be resumed at once. A second
        writer would duplicate rounds and privacy spending: it is refused, naming the holder."""
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise FedprivError(
                    f"{self.path} is being written by another fedpriv run (pid {holder}); "
                    "wait for it to end, or use another directory"
                ) from None
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield self

    def write_json(self, name: str, payload) -> Path:
        target = self.path / name
        target.write_text(json.dumps(_clean(payload), indent=2))
        return target

    def append_metrics(self, line: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(_clean(line)) + "\n")

    def rewrite_metrics(self, lines: list[dict]) -> None:
        """metrics.jsonl with exactly these lines (a resumed run continues from them)."""
        temporary = self.path / "metrics.jsonl.tmp"
        temporary.write_text("".join(json.dumps(_clean(line)) + "\n" for line in lines))
        os.replace(temporary, self.path / "metrics.jsonl")

    def save_weights(self, weights: dict[str, torch.Tensor], name: str = "model.pt") -> None:
        torch.save(weights, self.path / name)

    def _save(self, fig, name: str) -> Path:
        fig.tight_layout()
        target = self.path / name
        fig.savefig(target, dpi=120)
        _pyplot().close(fig)
        return target

    def plot_partition(self, table: list[dict]) -> Path:
        """Benign and malignant training images per hospital, stacked bars (at most 16
        inches wide: with many hospitals the bars get thin and the ticks numeric)."""
        plt = _pyplot()
        many = len(table) > 40
        hospitals = [row["hospital"] if many else str(row["hospital"]) for row in table]
        benign = [row["benign"] for row in table]
        fig, ax = plt.subplots(figsize=(min(16, max(4, 0.5 * len(table) + 2)), 3.2))
        ax.bar(hospitals, benign, label="benign")
        ax.bar(hospitals, [row["malignant"] for row in table], bottom=benign, label="malignant")
        ax.set_xlabel("hospital")
        ax.set_ylabel("training images")
        ax.legend()
        return self._save(fig, "partition.png")

    def plot_privacy_utility(self, lines: list[dict]) -> Path | None:
        """Test and val AUROC against the ε spent so far (max over hospitals), per round."""
        key = "max_epsilon" if lines and lines[0]["max_epsilon"] is not None else "client_epsilon"
        if not lines or lines[0][key] is None:
            return None
        plt = _pyplot()
        eps = [line[key] for line in lines]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        tested = lines[0]["auroc"] is not None  # evaluation.select=best_val: validation only
        if tested:
            ax.plot(eps, [line["auroc"] for line in lines], "o-", label="test")
        ax.plot(eps, [line["val_auroc"] for line in lines], "s--", label="val")
        for line, x in zip(lines, eps):
            y = line["auroc"] if tested else line["val_auroc"]
            ax.annotate(str(line["round"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("record-level ε (max over hospitals)" if key == "max_epsilon" else "client-level ε")
        ax.set_ylabel("AUROC")
        ax.legend(title="split")
        return self._save(fig, "privacy_utility.png")

    def plot_rounds(self, lines: list[dict]) -> Path:
        """AUROC (test, val) and max ε per round, one PNG."""
        plt = _pyplot()

        rounds = [line["round"] for line in lines]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if lines and lines[0]["auroc"] is not None:  # evaluation.select=best_val: validation only
            ax.plot(rounds, [line["auroc"] for line in lines], "o-", label="test AUROC")
        ax.plot(rounds, [line["val_auroc"] for line in lines], "s--", label="val AUROC")
        ax.set_xlabel("round")
        ax.set_ylabel("AUROC")
        ax.set_ylim(0.4, 1.0)
        if lines and lines[0]["max_epsilon"] is not None:
            twin = ax.twinx()
            twin.plot(rounds, [line["max_epsilon"] for line in lines], "k^:", label="max ε")
            twin.set_ylabel("ε spent (max over hospitals)")
            twin.legend(loc="lower right")
        ax.legend(loc="upper left")
        return self._save(fig, "rounds.png")
