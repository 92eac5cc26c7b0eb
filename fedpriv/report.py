"""`python -m fedpriv.report RUN_OR_SWEEP_DIR... [--out DIR]`: many runs → tables and plots.

Finds every finished run (a folder with summary.json; Hydra multirun folders included),
groups runs that differ only by seed, and writes `report.md` and `report.csv` (mean ± std
over seeds), `auroc_vs_epsilon.png`, `fairness_vs_epsilon.png`, `learning_curves.png`, and
the correlations of ε with statistical parity difference (Pearson r).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedpriv.errors import FedprivError

#: What makes two runs the same setting (everything that is not the seed).
SETTING_KEYS = ("data", "model", "privacy", "epsilon", "client_epsilon", "num_clients", "strategy", "partition", "rounds")
UTILITY = ("auroc", "auprc", "accuracy", "sensitivity", "specificity")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding summary.json) under the given folders, sorted."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise FedprivError(f"{path} is not a folder; give run or sweep folders")
        runs += [p.parent for p in path.rglob("summary.json")]
    if not runs:
        raise FedprivError(
            f"no finished runs (summary.json) under {', '.join(map(str, paths))}; "
            "point the report at run or multirun folders"
        )
    return sorted(set(runs))


def run_record(run: Path) -> dict:
    """The facts of one run the report needs (setting, seed, utility, ε, fairness, curve)."""
    summary = json.loads((run / "summary.json").read_text())
    settings, privacy = summary["settings"], summary["privacy"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "run": str(run),
        "data": summary["data"],
        "model": summary["model"],
        "privacy": privacy["mode"],
        "epsilon": privacy.get("target_epsilon", math.inf),
        "client_epsilon": privacy.get("client_level", {}).get("target_epsilon", math.inf),
        "num_clients": summary["num_clients"],
        "strategy": settings["strategy"]["name"],
        "partition": settings["partition"]["name"],
        "rounds": summary["rounds"],
        "seed": summary["seed"],
        "spent_epsilon": privacy.get("max_epsilon", math.inf),
        **{k: _num(summary["test"][k]) for k in UTILITY},
        "fairness": {
            name: {k: _num(report[k]) for k in ("spd", "worst_group_auroc", "auroc_gap", "equalized_odds_difference")}
            for name, report in (summary.get("fairness") or {}).items()
        },
        "curve": [(m["round"], _num(m["auroc"])) for m in metrics],
    }


def group_settings(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[tuple(record[k] for k in SETTING_KEYS)].append(record)
    return dict(sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0])))


def table_rows(groups: dict[tuple, list[dict]]) -> list[dict]:
    """One row per setting: mean and std over seeds of utility, ε spent and fairness."""
    rows = []
    for key, runs in groups.items():
        row = dict(zip(SETTING_KEYS, key))
        row["seeds"] = len(runs)
        for metric in (*UTILITY, "spent_epsilon"):
            row[metric], row[f"{metric}_std"] = _mean_std([r[metric] for r in runs])
        for attribute in sorted({a for r in runs for a in r["fairness"]}):
            for metric in ("worst_group_auroc", "spd"):
                values = [r["fairness"][attribute][metric] for r in runs if attribute in r["fairness"]]
                row[f"{attribute}.{metric}"], row[f"{attribute}.{metric}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def correlations(records: list[dict]) -> dict[str, dict]:
    """Pearson r of the target ε with SPD per attribute, over DP runs with finite ε."""
    from scipy.stats import pearsonr

    result = {}
    for attribute in sorted({a for r in records for a in r["fairness"]}):
        pairs = [
            (r["epsilon"], r["fairness"][attribute]["spd"])
            for r in records
            if attribute in r["fairness"] and math.isfinite(r["epsilon"]) and math.isfinite(r["fairness"][attribute]["spd"])
        ]
        xs, ys = zip(*pairs) if pairs else ((), ())
        if len(pairs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
            r, p = pearsonr(xs, ys)
            result[f"epsilon~spd[{attribute}]"] = {"r": float(r), "p": float(p), "n": len(pairs)}
        else:
            result[f"epsilon~spd[{attribute}]"] = {"r": math.nan, "p": math.nan, "n": len(pairs)}
    return result


def write_report(rows: list[dict], records: list[dict], correlation: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [k for k in columns if not k.endswith("_std") and k not in ("rounds",)]
    lines = [
        f"# fedpriv report — {len(records)} runs, {len(rows)} settings",
        "",
        "Test-split metrics of the final global model, mean ± std over seeds; ε columns are the",
        "configured targets (∞ = no DP at that level), `spent_epsilon` the ledger's record-level ε.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = [_cell(row, k) for k in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Correlations", "", "| pair | Pearson r | p | runs |", "|---|---|---|---|"]
    for name, c in correlation.items():
        lines.append(f"| {name} | {_fmt(c['r'])} | {_fmt(c['p'])} | {c['n']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "correlations.json").write_text(json.dumps(correlation, indent=2, allow_nan=True))
    return [out / "report.md", out / "report.csv", *plot_report(rows, records, out)]


def plot_report(rows: list[dict], records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for row in rows:
        series[tuple(row[k] for k in SETTING_KEYS if k != "epsilon")].append(row)
    written = []
    for name, metric, ylabel in (
        ("auroc_vs_epsilon.png", "auroc", "test AUROC"),
        ("fairness_vs_epsilon.png", None, "SPD (positive-rate gap)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in series.items():
            points = sorted(points, key=lambda r: r["epsilon"])
            finite = [p for p in points if math.isfinite(p["epsilon"])]
            label = ", ".join(f"{k}={v}" for k, v in zip([k for k in SETTING_KEYS if k != "epsilon"], key)
                              if k in ("privacy", "num_clients", "strategy", "model"))
            metrics = [metric] if metric else sorted({m[: -len(".spd")] for p in points for m in p if m.endswith(".spd")})
            for m in metrics:
                column = metric or f"{m}.spd"
                if finite and column in finite[0]:
                    ax.errorbar([p["epsilon"] for p in finite], [p[column] for p in finite],
                                yerr=[p.get(f"{column}_std", 0) for p in finite], marker="o", capsize=3,
                                label=label if metric else f"{label} [{m}]")
                for p in points:
                    if not math.isfinite(p["epsilon"]) and column in p:
                        ax.axhline(p[column], linestyle=":", color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("target ε (log); dotted: no DP")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for record in records:
        rounds, aurocs = zip(*record["curve"]) if record["curve"] else ((), ())
        eps = "∞" if not math.isfinite(record["epsilon"]) else f"{record['epsilon']:g}"
        ax.plot(rounds, aurocs, alpha=0.7, label=f"ε={eps} seed={record['seed']} K={record['num_clients']}")
    ax.set_xlabel("round")
    ax.set_ylabel("test AUROC")
    if len(records) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)
    written.append(out / "learning_curves.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpriv.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or sweep (multirun) folders")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where to write the report (default: report/)")
    args = parser.parse_args(argv)
    try:
        records = [run_record(run) for run in find_runs(args.runs)]
        groups = group_settings(records)
        rows = table_rows(groups)
        written = write_report(rows, records, correlations(records), args.out)
    except FedprivError as error:
        print(f"fedpriv: {error}", file=sys.stderr)
        return 2
    print(f"{len(records)} runs, {len(rows)} settings → " + ", ".join(str(p) for p in written))
    return 0


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if values and all(v == math.inf for v in values):
        return math.inf, 0.0
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}" if isinstance(value, float) else str(value)


def _cell(row: dict, key: str) -> str:
    value = row[key]
    if key in ("epsilon", "client_epsilon", "spent_epsilon") and isinstance(value, float) and math.isinf(value):
        return "∞"
    if f"{key}_std" in row and isinstance(value, float) and math.isfinite(value):
        return f"{value:.3f} ± {row[f'{key}_std']:.3f}"
    return _fmt(value)


if __name__ == "__main__":
    sys.exit(main())
