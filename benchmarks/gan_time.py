"""GAN wall time per hospital for the default phantom run at 64×64 with synthetic data
(budget from issue 5: ≤ 120 s per hospital on 2 CPU cores), next to the whole run's wall
time and test AUROC, for synthetic=augment and =pretrain against real data only.

    python benchmarks/gan_time.py [extra overrides, e.g. seed=1]
"""

from __future__ import annotations

import sys

from default_run import run

GAN_BUDGET_SECONDS = 120.0


def main() -> None:
    extra = sys.argv[1:]
    print(f"{'setting':<12}{'wall s':>8}{'GAN s (max)':>13}{'GAN/budget':>12}{'test AUROC':>12}{'TSTR AUROC':>12}{'max ε':>8}")
    for name in ("none", "augment", "pretrain"):
        wall, summary = run([f"synthetic={name}", *extra])
        synthetic = summary.get("synthetic", {})
        gan = synthetic.get("gan_seconds_max")
        gan_text = f"{gan:>13.1f}{gan / GAN_BUDGET_SECONDS:>12.2f}" if gan is not None else f"{'—':>13}{'—':>12}"
        tstr = synthetic.get("tstr_auroc")
        tstr_text = f"{tstr:.3f}" if tstr is not None else "—"
        print(f"{name:<12}{wall:>8.1f}{gan_text}{summary['test']['auroc']:>12.3f}{tstr_text:>12}{float(summary['privacy']['max_epsilon']):>8.2f}")


if __name__ == "__main__":
    main()
