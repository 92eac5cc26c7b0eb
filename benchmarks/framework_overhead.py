"""Framework overhead: simulation wall time over the work the hospitals and the server's
evaluation do, (Σ client seconds ÷ concurrent clients) + evaluation seconds, for 4, 10 and
100 hospitals (10 sampled per round beyond 10).

    python benchmarks/framework_overhead.py [--hospitals 4 10 100] [--rounds 3] [extra overrides…]

`rounds/work`: the round loop's wall time over that work (Flower messaging, Ray scheduling,
aggregation, ledger, checkpoints); `wall/work`: the whole command over the same work;
`fixed s`: what the command spends outside the rounds, whatever their number (imports, data,
Ray start, the workers' start-up and discovery of every hospital, final plots). Concurrent
clients: min(sampled, Ray CPUs ÷ backend.client_resources.num_cpus). A study's length:
`--hospitals 10 --rounds 50`.
"""

from __future__ import annotations

import argparse
import os

from _simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[4, 10, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. data.image_size=32")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    print(f"{'hospitals':>9}{'sampled':>8}{'conc.':>6}{'client s':>10}{'eval s':>8}{'work s':>8}"
          f"{'rounds s':>10}{'fixed s':>9}{'wall s':>8}{'rounds/work':>13}{'wall/work':>11}")
    for hospitals in args.hospitals:
        sampled = min(hospitals, 10)
        overrides = [f"num_clients={hospitals}", f"strategy.clients_per_round={sampled}", f"rounds={args.rounds}",
                     "local_epochs=1", "evaluation.bootstrap=0", *args.overrides]
        run = simulate(overrides)
        concurrent = min(sampled, cpus)  # one CPU per hospital (backend.client_resources.num_cpus=1)
        client = sum(sum(line["client_seconds"].values()) for line in run.lines)
        evaluation = sum(line["seconds"] - line["train_seconds"] for line in run.lines)
        work = client / concurrent + evaluation
        rounds = sum(line["seconds"] for line in run.lines)
        print(f"{hospitals:>9}{sampled:>8}{concurrent:>6}{client:>10.1f}{evaluation:>8.1f}{work:>8.1f}"
              f"{rounds:>10.1f}{run.wall - rounds:>9.1f}{run.wall:>8.1f}{rounds / work:>13.2f}{run.wall / work:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
