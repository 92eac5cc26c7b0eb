"""Run `python -m fedpriv.simulate` in a child process and measure it: wall time, the peak
resident memory of its whole process tree (driver, Ray's daemons and workers), its outputs.

Memory is read from /proc (Linux), sampled every `interval` seconds; RSS counts pages
shared between processes (torch's libraries) once per process, so it is an upper bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measured:
    wall: float
    peak_rss: int  # bytes, whole process tree
    lines: list[dict]  # metrics.jsonl
    summary: dict


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    tree, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
        stack.extend(tree.get(pid, []))
    return total


def simulate(overrides: list[str], interval: float = 0.2) -> Measured:
    """One simulation with these Hydra overrides, in a fresh run directory."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # a new local Ray instance, never a running cluster
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "fedpriv.simulate", *overrides, f"hydra.run.dir={tmp}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        peak = [0]

        def sample() -> None:
            while child.poll() is None:
                peak[0] = max(peak[0], tree_rss(child.pid))
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, stderr = child.communicate()
        wall = time.perf_counter() - started
        sampler.join()
        if child.returncode != 0:
            raise RuntimeError(f"simulation failed ({overrides}):\n{stderr[-3000:]}")
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        return Measured(wall, peak[0], lines, json.loads((Path(tmp) / "summary.json").read_text()))
