"""Scaling with the number of hospitals at 10 sampled per round: time per round and the
peak memory of the whole simulation (driver + Ray daemons and workers), for 10, 100, 1000.

    python benchmarks/scaling.py [--hospitals 10 100 1000] [--rounds 4] [--patients-per-hospital 4] [--eval-patients 100]

Each hospital holds the same amount of data at every size (patients-per-hospital training
patients, one 32×32 view each) and the server's validation and test splits are the same
size at every size (`--eval-patients` each), so a sampled hospital's work and the server's
evaluation are the same and any growth is the framework's. `train s`: a round's training
incl. messaging (median over rounds 2…, round 1 also starts the workers); `eval s`: the
server's evaluation of the global model.
"""

from __future__ import annotations

import argparse
import statistics

from _simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--patients-per-hospital", type=int, default=4)
    parser.add_argument("--eval-patients", type=int, default=100, help="patients in each of the val and test splits")
    args = parser.parse_args()
    rows = []
    print(f"{'hospitals':>9}{'patients':>9}{'round 1 s':>10}{'train s':>9}{'eval s':>8}{'round s':>9}"
          f"{'client s':>10}{'wall s':>8}{'peak GiB':>10}")
    for hospitals in args.hospitals:
        patients = args.patients_per_hospital * hospitals + 2 * args.eval_patients
        run = simulate([
            f"num_clients={hospitals}", "strategy.clients_per_round=10", f"rounds={args.rounds}", "local_epochs=1",
            f"data.num_patients={patients}", f"data.val_fraction={args.eval_patients / patients}",
            f"data.test_fraction={args.eval_patients / patients}", "data.images_per_patient=1",
            "data.image_size=32", "training.batch_size=8", "evaluation.bootstrap=0",
        ])
        later = run.lines[1:] or run.lines
        train = statistics.median(line["train_seconds"] for line in later)
        total = statistics.median(line["seconds"] for line in later)
        client = statistics.median(sum(line["client_seconds"].values()) for line in later)
        rows.append((hospitals, total, train, run.peak_rss))
        print(f"{hospitals:>9}{patients:>9}{run.lines[0]['seconds']:>10.2f}{train:>9.2f}"
              f"{total - train:>8.2f}{total:>9.2f}{client:>10.2f}{run.wall:>8.1f}{run.peak_rss / 2**30:>10.2f}", flush=True)
    base = rows[0]
    for hospitals, total, train, peak in rows[1:]:
        print(f"{hospitals} vs {base[0]} hospitals: train time ×{train / base[2]:.2f}, round time ×{total / base[1]:.2f}, "
              f"peak memory ×{peak / base[3]:.2f}")


if __name__ == "__main__":
    main()
