"""What a sweep pays beyond its runs' work: `fedpriv simulate -m` over ε × seeds, as one command.

The runs of a sweep share one Ray instance and its warm hospital workers (their imports,
data, priors and backbone outputs stay in memory), so only the first run pays Ray's start,
the workers' start-up and the data build. Prints, per run, its work (the rounds' own wall
time: training, aggregation, evaluation) and its fixed cost (the time from its start to the
next run's start, less its work), then the sweep's wall time over the sum of its work.

    python benchmarks/sweep_cost.py [--epsilons 1,8] [--seeds 0,1,2,3,4] [extra overrides…]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def started_at(run_dir: Path) -> float:
    """When the run logged its first line (simulate.log's first timestamp), in epoch seconds."""
    stamp = (run_dir / "simulate.log").read_text().split("]", 1)[0].lstrip("[")
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def work_seconds(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(line["seconds"] for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,8")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (the default run without any)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"FLWR_TELEMETRY_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "fedpriv.simulate", "-m", f"privacy.target_epsilon={args.epsilons}",
            f"seed={args.seeds}", *args.overrides, f"hydra.sweep.dir={tmp}",
        ]
        started = time.time()
        subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ended = time.time()
        runs = sorted((p for p in Path(tmp).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        starts = [started_at(run) for run in runs] + [ended]
        work = [work_seconds(run) for run in runs]
    print(f"{'run':>4}{'work s':>9}{'fixed s':>9}")
    for i, run in enumerate(runs):
        print(f"{run.name:>4}{work[i]:>9.1f}{starts[i + 1] - starts[i] - work[i]:>9.1f}")
    later = [starts[i + 1] - starts[i] - work[i] for i in range(1, len(runs))]
    print(f"command start → first run: {starts[0] - started:.1f} s; first run's fixed cost "
          f"{starts[1] - starts[0] - work[0]:.1f} s; later runs' median {sorted(later)[len(later) // 2]:.1f} s")
    print(f"sweep wall {ended - started:.1f} s / sum of the runs' work {sum(work):.1f} s = {(ended - started) / sum(work):.2f}×")


if __name__ == "__main__":
    main()
