"""`python -m fedpriv.report RUN_OR_SWEEP_DIR... [--out DIR]`: many runs → tables and plots.

Finds every finished run (a folder with summary.json; Hydra multirun folders included),
groups runs that differ only by seed, and writes `report.md` and `report.csv` (mean ± std
over seeds; external test sets as `external.<name>.auroc`), `auroc_vs_epsilon.png`, `fairness_vs_epsilon.png`, `learning_curves.png`,
`audit_vs_epsilon.png` (runs with audit=mia), and the correlations (Pearson r) of ε with
statistical parity difference and of the AUROC drop under DP with subgroup size and with
non-private AUROC.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedpriv.errors import FedprivError
from fedpriv.outputs import write_json

#: What makes two runs the same setting (everything that is not the seed).
SETTING_KEYS = (
    "data", "model", "privacy", "epsilon", "client_epsilon", "clip", "synthetic", "num_clients", "strategy", "partition",
    "rounds", "training",
)
UTILITY = ("auroc", "auprc", "accuracy", "sensitivity", "specificity")
#: Setting keys that a privacy–utility series runs over (a DP run and its non-private twin share the rest).
PRIVACY_KEYS = ("privacy", "epsilon", "client_epsilon", "clip")


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
        "data": f"{summary['data']} {settings['data']['image_size']}px",
        "model": _model_setting(summary["model"], settings["model"].get("kwargs")),
        "privacy": privacy["mode"],
        "epsilon": privacy.get("target_epsilon", math.inf),
        "client_epsilon": privacy.get("client_level", {}).get("target_epsilon", math.inf),
        "clip": _clip_setting(privacy),
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
        "groups": {
            name: {group: (_num(m["auroc"]), m["n"]) for group, m in report["groups"].items()}
            for name, report in (summary.get("fairness") or {}).items()
        },
        "synthetic": _synthetic_setting(settings.get("synthetic", {"name": "none"})),
        "training": _training_setting(settings),
        "tstr_auroc": _num(summary.get("synthetic", {}).get("tstr_auroc")),
        "audit_auroc": _num(summary.get("audit", {}).get("pooled", {}).get("attack_auroc")),
        "audit_epsilon": _num(summary.get("audit", {}).get("pooled", {}).get("epsilon_lower_bound_ci")),
        **_curve(metrics),
        "external": {name: _num(m["auroc"]) for name, m in (summary.get("external") or {}).items()},
    }


def _curve(metrics: list[dict]) -> dict:
    """AUROC per round on the test split, or on the validation split for runs that left the
    test split for the selected model alone (evaluation.select=best_val)."""
    split = "test" if metrics and metrics[0]["auroc"] is not None else "val"
    key = "auroc" if split == "test" else "val_auroc"
    return {"curve_split": split, "curve": [(m["round"], _num(m[key])) for m in metrics]}


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
        audited = ("audit_auroc", "audit_epsilon") if any(math.isfinite(r["audit_auroc"]) for r in runs) else ()
        synthetic = ("tstr_auroc",) if any(math.isfinite(r["tstr_auroc"]) for r in runs) else ()
        for metric in (*UTILITY, "spent_epsilon", *synthetic, *audited):
            row[metric], row[f"{metric}_std"] = _mean_std([r[metric] for r in runs])
        for attribute in sorted({a for r in runs for a in r["fairness"]}):
            for metric in ("worst_group_auroc", "spd"):
                values = [r["fairness"][attribute][metric] for r in runs if attribute in r["fairness"]]
                row[f"{attribute}.{metric}"], row[f"{attribute}.{metric}_std"] = _mean_std(values)
        for name in sorted({n for r in runs for n in r["external"]}):
            values = [r["external"][name] for r in runs if name in r["external"]]
            row[f"external.{name}.auroc"], row[f"external.{name}.auroc_std"] = _mean_std(values)
        rows.append(row)
    return rows


def correlations(records: list[dict]) -> dict[str, dict]:
    """Pearson r, as Tayebi Arasteh et al. report them: of the target ε with SPD per attribute
    (DP runs with finite ε), and of each subgroup's AUROC drop under DP with the subgroup's
    size and with its non-private AUROC (DP runs paired with the non-private run of the same
    setting and seed)."""
    result = {}
    for attribute in sorted({a for r in records for a in r["fairness"]}):
        pairs = [
            (r["epsilon"], r["fairness"][attribute]["spd"])
            for r in records
            if attribute in r["fairness"] and math.isfinite(r["epsilon"])
        ]
        result[f"epsilon~spd[{attribute}]"] = _pearson(pairs)
    drops = auroc_drops(records)
    result["auroc_drop~subgroup_size"] = _pearson([(n, drop) for drop, n, _ in drops])
    result["auroc_drop~nonprivate_auroc"] = _pearson([(base, drop) for drop, _, base in drops])
    return result


def auroc_drops(records: list[dict]) -> list[tuple[float, int, float]]:
    """(non-private AUROC − DP AUROC, subgroup size, non-private AUROC) for every subgroup of
    every DP run that has a non-private twin (same setting apart from privacy, same seed)."""
    twin_keys = [k for k in SETTING_KEYS if k not in PRIVACY_KEYS]
    baseline = {
        (*(r[k] for k in twin_keys), r["seed"]): r for r in records if r["privacy"] == "none"
    }
    drops = []
    for record in records:
        base = baseline.get((*(record[k] for k in twin_keys), record["seed"]))
        if record["privacy"] == "none" or base is None:
            continue
        for attribute, groups in record["groups"].items():
            for group, (auroc, n) in groups.items():
                base_auroc = base["groups"].get(attribute, {}).get(group, (math.nan, 0))[0]
                if math.isfinite(auroc) and math.isfinite(base_auroc):
                    drops.append((base_auroc - auroc, n, base_auroc))
    return drops


def _pearson(pairs: list[tuple[float, float]]) -> dict:
    """Pearson r and p over the finite pairs; NaN when fewer than 3 or a constant side."""
    from scipy.stats import pearsonr

    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    xs, ys = zip(*pairs) if pairs else ((), ())
    if len(pairs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"r": math.nan, "p": math.nan, "n": len(pairs)}
    r, p = pearsonr(xs, ys)
    return {"r": float(r), "p": float(p), "n": len(pairs)}


def load_reference(path: Path) -> list[dict]:
    """Published test AUROCs to set the runs against: a CSV with the columns `name`,
    `epsilon` (`inf` for no DP) and `auroc`, one line per published number."""
    try:
        with open(path, newline="") as handle:
            lines = list(csv.DictReader(handle))
    except OSError as error:
        raise FedprivError(f"--reference {path}: cannot be read ({error.strerror})") from None
    if not lines or {"name", "epsilon", "auroc"} - set(lines[0]):
        raise FedprivError(f"--reference {path}: needs a header with the columns name, epsilon, auroc and one line per number")
    reference = []
    for number, line in enumerate(lines, start=2):
        try:
            epsilon, auroc = float(line["epsilon"]), float(line["auroc"])
        except (TypeError, ValueError):
            raise FedprivError(f"--reference {path}, line {number}: epsilon and auroc must be numbers (epsilon may be inf)") from None
        if not (epsilon > 0 and 0 <= auroc <= 1 and line["name"]):
            raise FedprivError(f"--reference {path}, line {number}: needs a name, epsilon > 0 and auroc in [0, 1]")
        reference.append({"name": line["name"], "epsilon": epsilon, "auroc": auroc})
    return reference


def groupby_name(reference: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Published (ε, AUROC) pairs per name, in the file's order of names."""
    named = defaultdict(list)
    for r in reference:
        named[r["name"]].append((r["epsilon"], r["auroc"]))
    return dict(named)


def reference_comparison(rows: list[dict], reference: list[dict]) -> list[str]:
    """Markdown: each series of runs (settings that differ only in ε, non-private included)
    next to the published numbers, at the published ε values, and at how many of those ε
    the series' mean test AUROC is above each published line."""
    epsilons = sorted({r["epsilon"] for r in reference})
    published = {name: dict(values) for name, values in groupby_name(reference).items()}
    twin_keys = [k for k in SETTING_KEYS if k not in PRIVACY_KEYS]

    def setting(row: dict) -> tuple:
        return tuple((k, row[k]) for k in SETTING_KEYS if k != "epsilon")

    series = defaultdict(dict)  # DP settings that differ only in ε (another clipping norm: another series)
    for row in rows:
        if row["privacy"] != "none":
            series[setting(row)][row["epsilon"]] = row
    for row in [r for r in rows if r["privacy"] == "none"]:  # a non-private run joins each series it is the twin of
        twins = [key for key in series if all(dict(key)[k] == row[k] for k in twin_keys)]
        for key in twins or [setting(row)]:
            series[key][math.inf] = row
    varying = [k for k in SETTING_KEYS if k != "epsilon" and len({dict(key)[k] for key in series}) > 1]
    header = ["", *("∞" if math.isinf(e) else f"{e:g}" for e in epsilons), *(f"above {name}" for name in published)]
    lines = [
        "## Against published results",
        "",
        "Test AUROC, mean ± std over seeds, at each published ε (columns); `above`: at how many of",
        "the published ε values this series' mean is higher than the published number.",
        "",
        *_markdown_head(header),
    ]
    for name, values in published.items():
        cells = [_fmt(values[e]) if e in values else "—" for e in epsilons]
        lines.append(_markdown_row([f"published: {name}", *cells, *("" for _ in published)]))
    for key, points in series.items():
        label = ", ".join(f"{k}={v}" for k, v in key if k in varying) or "these runs"
        cells = [_cell(points[e], "auroc") if e in points else "—" for e in epsilons]
        above = []
        for values in published.values():
            shared = [e for e in values if e in points and math.isfinite(points[e]["auroc"])]
            above.append(f"{sum(points[e]['auroc'] > values[e] for e in shared)}/{len(shared)}")
        lines.append(_markdown_row([f"fedpriv: {label}", *cells, *above]))
    return ["", *lines]


def write_report(rows: list[dict], records: list[dict], correlation: dict, out: Path, reference: list[dict] = ()) -> list[Path]:
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
        "Test-split metrics of the final global model, mean ± std over seeds (one seed: its value alone);",
        "accuracy, sensitivity and specificity at each run's decision threshold (`thr=` in `training`); ε columns are the",
        "configured targets (∞ = no DP at that level), `spent_epsilon` the ledger's record-level ε.",
        "",
        *_markdown_head(shown),
    ]
    lines += [_markdown_row([_cell(row, k) for k in shown]) for row in rows]
    lines += ["", "## Correlations", "", "| pair | Pearson r | p | runs |", "|---|---|---|---|"]
    for name, c in correlation.items():
        lines.append(f"| {name} | {_fmt(c['r'])} | {_fmt(c['p'])} | {c['n']} |")
    if reference:
        lines += reference_comparison(rows, reference)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "correlations.json", correlation)  # an undefined r is null, not a bare NaN
    return [out / "report.md", out / "report.csv", *plot_report(rows, records, out, reference)]


def plot_report(rows: list[dict], records: list[dict], out: Path, reference: list[dict] = ()) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    series = defaultdict(list)
    for row in rows:
        series[tuple(row[k] for k in SETTING_KEYS if k != "epsilon")].append(row)
    keys = [k for k in SETTING_KEYS if k != "epsilon"]
    # a series is labelled by what tells it apart from the others (privacy mode when nothing does)
    labelled = [k for i, k in enumerate(keys) if k != "client_epsilon" and len({key[i] for key in series}) > 1] or ["privacy"]
    written = []
    for name, metric, ylabel in (
        ("auroc_vs_epsilon.png", "auroc", "test AUROC"),
        ("fairness_vs_epsilon.png", None, "SPD (positive-rate gap)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
        for key, points in series.items():
            points = sorted(points, key=lambda r: r["epsilon"])
            finite = [p for p in points if math.isfinite(p["epsilon"])]
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, key) if k in labelled)
            metrics = [metric] if metric else sorted({m[: -len(".spd")] for p in points for m in p if m.endswith(".spd")})
            for m in metrics:
                column = metric or f"{m}.spd"
                legend_name = label if metric else f"{label} [{m}]"
                colour = next(colours)
                if finite and column in finite[0]:
                    ax.errorbar([p["epsilon"] for p in finite], [p[column] for p in finite],
                                yerr=[_or_zero(p.get(f"{column}_std")) for p in finite], marker="o", capsize=3,
                                label=legend_name, color=colour)
                for p in points:  # the non-private run of this setting: a dotted line in its colour
                    if not math.isfinite(p["epsilon"]) and column in p:
                        ax.axhline(p[column], linestyle=":", color=colour, label=f"no DP: {legend_name}")
        if metric == "auroc":  # published numbers: dashed, x markers
            for published, values in groupby_name(reference).items():
                finite = sorted((e, v) for e, v in values if math.isfinite(e))
                if finite:
                    ax.plot(*zip(*finite), "x--", alpha=0.8, label=f"published: {published}")
        ax.set_xscale("log")
        plotted = sorted(({r["epsilon"] for r in rows} | {r["epsilon"] for r in reference}) - {math.inf})
        if plotted:  # ticks at the ε values the runs (and published lines) have, as plain numbers
            ax.set_xticks(plotted, labels=[f"{e:g}" for e in plotted])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("target ε (log); dotted: no DP")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:  # beside the axes: long setting labels never cover the curves
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles, [textwrap.fill(label, 60) for label in labels], fontsize=6,
                      loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in records:
        rounds, aurocs = zip(*record["curve"]) if record["curve"] else ((), ())
        eps = "∞" if not math.isfinite(record["epsilon"]) else f"{record['epsilon']:g}"
        ax.plot(rounds, aurocs, "-" if record["curve_split"] == "test" else "--", alpha=0.7,
                label=f"ε={eps} seed={record['seed']} " + ("centralized" if record["num_clients"] == 1 else f"hospitals={record['num_clients']}"))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    splits = sorted({record["curve_split"] for record in records})
    ax.set_ylabel({("test",): "test AUROC", ("val",): "validation AUROC"}.get(tuple(splits), "AUROC (solid: test, dashed: validation)"))
    if len(records) <= 12:  # beside the axes, as above
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.savefig(out / "learning_curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(out / "learning_curves.png")
    audited = [r for r in records if math.isfinite(r["audit_epsilon"])]
    if audited:
        written.append(plot_audit(audited, out / "audit_vs_epsilon.png", plt))
    return written


def plot_audit(records: list[dict], path: Path, plt) -> Path:
    """Empirical ε lower bound (membership inference) against the accounted ε; a run whose
    point lies above the diagonal would contradict its accounting. No-DP runs sit at "∞"."""
    finite = [r["spent_epsilon"] for r in records if math.isfinite(r["spent_epsilon"])]
    infinity = 3 * max(finite + [1.0])
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r["spent_epsilon"] if math.isfinite(r["spent_epsilon"]) else infinity for r in records]
    for private, colour, label in ((True, "C0", "DP runs"), (False, "C3", "runs without record-level DP")):
        chosen = [(x, r["audit_epsilon"]) for x, r in zip(xs, records) if (x != infinity) == private]
        if chosen:
            ax.scatter(*zip(*chosen), c=colour, label=label)
    top = max(xs + [r["audit_epsilon"] for r in records])
    ax.plot([0, infinity], [0, infinity], linestyle="--", color="grey", label="empirical = accounted")
    ax.set_xlim(0, infinity * 1.1)
    ax.set_ylim(0, max(1.0, min(top, infinity)) * 1.1)
    ax.set_xticks([*ax.get_xticks()[ax.get_xticks() < infinity * 0.8], infinity], minor=False)
    ax.set_xticklabels([*(f"{t:g}" for t in ax.get_xticks()[:-1]), "∞ (no DP)"])
    ax.set_xlabel("accounted ε (record level)")
    ax.set_ylabel("empirical ε lower bound (MIA, 95%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, prog: str = "python -m fedpriv.report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or sweep (multirun) folders")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where to write the report (default: report/)")
    parser.add_argument("--reference", type=Path, help="CSV of published test AUROCs (name, epsilon, auroc) to compare with")
    args = parser.parse_args(argv)
    try:
        reference = load_reference(args.reference) if args.reference else []
        records = [run_record(run) for run in find_runs(args.runs)]
        groups = group_settings(records)
        rows = table_rows(groups)
        written = write_report(rows, records, correlations(records), args.out, reference)
    except FedprivError as error:
        print(f"fedpriv: {error}", file=sys.stderr)
        return 2
    print(f"{len(records)} runs, {len(rows)} settings → " + ", ".join(str(p) for p in written))
    return 0


def _model_setting(name: str, kwargs) -> str:
    """The model's name with its model.kwargs, e.g. `fedpriv_cnn_small(widths=[16, 32, 64])`."""
    pairs = kwargs.items() if isinstance(kwargs, dict) else (kwargs or [])
    return name + (f"({', '.join(f'{k}={v}' for k, v in pairs)})" if pairs else "")


def _training_setting(settings: dict) -> str:
    """The DP-training techniques of a run in one cell, e.g. `sgd lr=0.2 B=221 cosine K=4 ema=0.6
    best_val thr=youden` (runs that differ in any of them, or in the decision-threshold rule
    their accuracy, sensitivity and specificity use, are different settings)."""
    training, evaluation = settings["training"], settings["evaluation"]
    ema = evaluation.get("ema")
    return " ".join([
        f"{training['optimizer']} lr={training['lr']:g} B={training['batch_size']}", training.get("lr_schedule", "constant"),
        f"K={training.get('augmentations', 1)}", f"ema={ema:g}" if ema is not None else "no-ema",
        evaluation.get("select", "last"), f"thr={evaluation.get('threshold', 0.5)}",  # runs before the setting: 0.5
    ])


def _clip_setting(privacy: dict) -> str:
    """DP-SGD's clipping norm, `10→2` under a clipping-norm schedule; `-` without DP-SGD."""
    start, final = privacy.get("max_grad_norm"), privacy.get("final_max_grad_norm")
    if start is None:
        return "-"
    return f"{start:g}" if final is None else f"{start:g}→{final:g}"


def _synthetic_setting(synthetic: dict) -> str:
    """none, augment, pretrain — marked when the GAN was not private."""
    return synthetic["name"] + (" (GAN without DP)" if synthetic.get("dp") is False else "")


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over the finite values; the std is NaN (undefined) for one value."""
    finite = [v for v in values if math.isfinite(v)]
    if values and all(v == math.inf for v in values):
        return math.inf, math.nan
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _or_zero(value) -> float:
    """An error bar's half-width: none (0) where the std is undefined (one seed)."""
    return value if value is not None and math.isfinite(value) else 0.0


def _markdown_head(columns: list[str]) -> list[str]:
    return [_markdown_row(columns), "|" + "---|" * len(columns)]


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}" if isinstance(value, float) else str(value)


def _cell(row: dict, key: str) -> str:
    value = row.get(key, math.nan)  # a column only some settings have (audit, synthetic, an external test set)
    if key in ("epsilon", "client_epsilon", "spent_epsilon") and isinstance(value, float) and math.isinf(value):
        return "∞"
    std = row.get(f"{key}_std")
    if isinstance(value, float) and math.isfinite(value) and isinstance(std, float) and math.isfinite(std):
        return f"{value:.3f} ± {std:.3f}"  # one run (or one finite value): no ± at all
    return _fmt(value)


if __name__ == "__main__":
    sys.exit(main())
