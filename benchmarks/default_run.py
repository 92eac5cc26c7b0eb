"""Wall time and test AUROC of `python -m fedpriv.simulate` (the default run), and the
privacy–utility trade-off on the phantom: the same run at ε = 1 and without DP.

    python benchmarks/default_run.py            # default run only
    python benchmarks/default_run.py --tradeoff # + ε=1 and privacy=none

Budget from issue 2: ≤ 120 s wall on 2 CPU cores and test AUROC ≥ 0.85 (ratios printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS, TARGET_AUROC = 120.0, 0.85


def run(overrides: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedpriv.simulate", *overrides, f"hydra.run.dir={tmp}"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        )
        wall = time.perf_counter() - started
        return wall, json.loads((Path(tmp) / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tradeoff", action="store_true", help="also run ε=1 and privacy=none")
    args = parser.parse_args()
    settings = {"default (ε=8)": []}
    if args.tradeoff:
        settings.update({"ε=1": ["privacy.target_epsilon=1"], "non-private": ["privacy=none"]})
    print(f"{'setting':<16}{'wall s':>8}{'wall/budget':>13}{'test AUROC':>12}{'AUROC/target':>14}{'max ε':>8}")
    for name, overrides in settings.items():
        wall, summary = run(overrides)
        auroc = summary["test"]["auroc"]
        eps = summary["privacy"].get("max_epsilon")
        eps_text = f"{eps:.2f}" if eps is not None else "∞"
        print(f"{name:<16}{wall:>8.1f}{wall / BUDGET_SECONDS:>13.2f}{auroc:>12.3f}{auroc / TARGET_AUROC:>14.2f}{eps_text:>8}")


if __name__ == "__main__":
    main()
