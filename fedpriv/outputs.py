"""The run directory: metrics.jsonl, summary.json, partition table, weights and plots."""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from fedpriv.errors import FedprivError

#: The file whose OS lock marks the one process writing a run directory (it holds its pid).
LOCK_FILE = "run.lock"


def json_safe(value):
    """JSON has no NaN or infinity: undefined metrics are written as null, an infinite one
    (e.g. ε without DP) as the string "inf" (Python's float() reads it back); numpy scalars
    become Python numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(payload, indent: int | None = 2) -> str:
    """Strict JSON (no bare NaN or Infinity, which most JSON readers reject)."""
    return json.dumps(json_safe(payload), indent=indent, allow_nan=False)


def write_json(path: Path, payload) -> Path:
    path = Path(path)
    path.write_text(to_json(payload))
    return path


def _number(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def describe_round(line: dict, rounds: int) -> str:
    """One metrics line as one line of text (console and log): test and validation AUROC,
    sensitivity and specificity at the round's threshold, training loss, ε so far, failures
    and seconds, e.g. `round 2/5  AUROC 0.702 val 0.688  sens 0.81 spec 0.64 @0.47  loss
    0.581  ε 5.38  6.9 s`."""
    if line["auroc"] is not None:
        parts = [f"round {line['round']}/{rounds}", f"AUROC {_number(line['auroc'])} val {_number(line['val_auroc'])}"]
        sens, spec = line["sensitivity"], line["specificity"]
    else:  # evaluation.select=best_val: the test split waits for the selected model
        parts = [f"round {line['round']}/{rounds}", f"val AUROC {_number(line['val_auroc'])}"]
        sens, spec = line["val_sensitivity"], line["val_specificity"]
    at = f" @{line['threshold']:.3g}" if line.get("threshold") is not None else ""
    parts.append(f"sens {_number(sens, 2)} spec {_number(spec, 2)}{at}")
    parts.append(f"loss {_number(line['train_loss'])}")
    if line["max_epsilon"] is not None:
        parts.append(f"ε {line['max_epsilon']:.2f}")
    if line["client_epsilon"] is not None:
        parts.append(f"client-level ε {line['client_epsilon']:.2f}")
    if line["hospitals_failed"]:
        parts.append(f"failed: hospitals {', '.join(sorted(line['hospitals_failed']))}")
    if line["hospitals_exhausted"]:
        parts.append(f"budget spent: hospitals {', '.join(map(str, line['hospitals_exhausted']))}")
    if not line["released"]:
        parts.append("not released (client-level DP needs every sampled hospital)")
    parts.append(f"{line['seconds']:.1f} s")
    return "  ".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lock_holder(handle, wait_s: float = 2.0) -> str:
    """The pid the holder writes just after it takes the lock (allowing it that moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        holder = handle.read().strip()
        if holder or time.monotonic() > deadline:
            return holder or "unknown"
        time.sleep(0.05)


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
                holder = _lock_holder(handle)
                raise FedprivError(
                    f"{self.path} is being written by another fedpriv run (pid {holder}); "
                    "wait for it to end, or use another directory"
                ) from None
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield self

    def write_json(self, name: str, payload) -> Path:
        return write_json(self.path / name, payload)

    def append_metrics(self, line: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(to_json(line, indent=None) + "\n")

    def rewrite_metrics(self, lines: list[dict]) -> None:
        """metrics.jsonl with exactly these lines (a resumed run continues from them)."""
        temporary = self.path / "metrics.jsonl.tmp"
        temporary.write_text("".join(to_json(line, indent=None) + "\n" for line in lines))
        os.replace(temporary, self.path / "metrics.jsonl")

    def save_weights(self, weights: dict[str, torch.Tensor], name: str = "model.pt") -> None:
        import torch

        torch.save(weights, self.path / name)

    def _save(self, fig, name: str) -> Path:
        target = self.path / name
        fig.savefig(target, dpi=120, bbox_inches="tight")  # legends placed outside the axes included
        _pyplot().close(fig)
        return target

    def plot_partition(self, table: list[dict]) -> Path:
        """Benign and malignant training images per hospital, stacked bars (at most 16
        inches wide: with many hospitals the bars get thin and the ticks numeric)."""
        plt = _pyplot()
        many = len(table) > 40
        hospitals = [row["hospital"] if many else str(row["hospital"]) for row in table]
        benign = [row["benign"] for row in table]
        fig, ax = plt.subplots(figsize=(min(16, max(4, 0.5 * len(table) + 2)), 3.2), layout="constrained")
        ax.bar(hospitals, benign, label="benign")
        ax.bar(hospitals, [row["malignant"] for row in table], bottom=benign, label="malignant")
        ax.set_xlabel("hospital")
        ax.set_ylabel("training images")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=2, frameon=False)  # above the bars
        return self._save(fig, "partition.png")

    def plot_privacy_utility(self, lines: list[dict]) -> Path | None:
        """Test and val AUROC against the ε spent so far (max over hospitals), per round (the
        round's number beside each point)."""
        key = "max_epsilon" if lines and lines[0]["max_epsilon"] is not None else "client_epsilon"
        if not lines or lines[0][key] is None:
            return None
        plt = _pyplot()
        eps = [line[key] for line in lines]
        fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
        tested = lines[0]["auroc"] is not None  # evaluation.select=best_val: validation only
        if tested:
            ax.plot(eps, [line["auroc"] for line in lines], "o-", label="test")
        ax.plot(eps, [line["val_auroc"] for line in lines], "s--", label="validation")
        for line, x in zip(lines, eps):
            y = line["auroc"] if tested else line["val_auroc"]
            ax.annotate(str(line["round"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("record-level ε (max over hospitals)" if key == "max_epsilon" else "client-level ε")
        ax.set_ylabel("AUROC")
        ax.set_title("AUROC against ε spent (numbers: rounds)", fontsize=9)
        ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        return self._save(fig, "privacy_utility.png")

    def plot_rounds(self, lines: list[dict]) -> Path:
        """Per round: test and validation AUROC with the ε spent so far (right axis), and the
        hospitals' training loss below; one legend beside the axes."""
        plt = _pyplot()
        from matplotlib.ticker import MaxNLocator

        rounds = [line["round"] for line in lines]
        fig, (ax, loss) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=[3, 2], layout="constrained")
        aurocs = [line["val_auroc"] for line in lines]
        if lines and lines[0]["auroc"] is not None:  # evaluation.select=best_val: validation only
            ax.plot(rounds, [line["auroc"] for line in lines], "o-", label="test AUROC")
            aurocs += [line["auroc"] for line in lines]
        ax.plot(rounds, [line["val_auroc"] for line in lines], "s--", label="validation AUROC")
        ax.set_ylabel("AUROC")
        finite = [a for a in aurocs if a is not None and math.isfinite(a)]
        ax.set_ylim(min([0.4, *finite]) - 0.02, 1.0)
        handles, labels = ax.get_legend_handles_labels()
        if lines and lines[0]["max_epsilon"] is not None:
            twin = ax.twinx()
            twin.plot(rounds, [line["max_epsilon"] for line in lines], "k^:", label="ε spent (max over hospitals)")
            twin.set_ylabel("ε spent")
            twin.set_ylim(bottom=0)
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=8, frameon=False)
        loss.plot(rounds, [line["train_loss"] for line in lines], "o-", color="C3")
        loss.set_ylabel("training loss\n(mean over hospitals)")
        loss.set_xlabel("round")
        loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        return self._save(fig, "rounds.png")
