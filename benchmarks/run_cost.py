"""What one test-sized run costs in the test process, three ways: on a local Ray instance
started and stopped for the run (`fedpriv simulate`'s default), attached to a Ray cluster
started once (the test session's, conftest.ray_cluster), and with the hospitals in the test
process (tests/in_process.py, no engine). Same settings, same results; the difference is
the engine's fixed cost: Ray's start and stop, the workers' start-up (each imports torch and
fedpriv and builds the data), discovery.

    python benchmarks/run_cost.py [--repeat 2] [extra overrides…]

`rounds s`: the rounds' own wall time (training, aggregation, evaluation), the same work in
every mode; `fixed s`: everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY, make_settings, started_ray_cluster  # noqa: E402
from fedpriv.experiment import run_experiment  # noqa: E402
from in_process import run_in_process  # noqa: E402


def measure(run, overrides: list[str]) -> tuple[float, float]:
    """(wall seconds, the rounds' seconds) of one run in a fresh directory."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run(make_settings(overrides), Path(tmp) / "run")
        wall = time.perf_counter() - started
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return wall, sum(line["seconds"] for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (conftest.TINY first)")
    args = parser.parse_args()
    overrides = [*TINY, *args.overrides]
    measure(run_in_process, overrides)  # first use of the model, data and priors in this process: not counted
    print(f"{'mode':<22}{'wall s':>8}{'rounds s':>10}{'fixed s':>9}{'× in-process':>14}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {}
    results["in process"] = [measure(run_in_process, overrides) for _ in range(args.repeat)]
    results["local Ray per run"] = [measure(run_experiment, overrides) for _ in range(args.repeat)]
    with started_ray_cluster() as cluster:
        results["attached to a cluster"] = [measure(run_experiment, [*overrides, *cluster.overrides]) for _ in range(args.repeat)]
    base = min(wall for wall, _ in results["in process"])
    for mode, runs in results.items():
        for wall, rounds in runs:
            print(f"{mode:<22}{wall:>8.1f}{rounds:>10.1f}{wall - rounds:>9.1f}{wall / base:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
