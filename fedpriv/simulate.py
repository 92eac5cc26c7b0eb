"""`python -m fedpriv.simulate k=v ...`: compose the Hydra config and run one simulation."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpriv import CONFIG_DIR
from fedpriv.errors import FedprivError

console = Console(stderr=True)
log = logging.getLogger("fedpriv.simulate")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


#: Hospitals listed one per row on the console; the rest are counted (all are in the files).
SHOWN_HOSPITALS = 20


def partition_table(table: list[dict]) -> Table:
    shown = Table(title="hospitals (training data)")
    for column in ("hospital", "patients", "images", "malignant_pct"):
        shown.add_column(column.replace("_pct", " %"), justify="right")
    for row in table[:SHOWN_HOSPITALS]:
        shown.add_row(*(str(row[c]) for c in ("hospital", "patients", "images", "malignant_pct")))
    if len(table) > SHOWN_HOSPITALS:
        shown.add_row(f"… {len(table) - SHOWN_HOSPITALS} more", "", "", "")
    return shown


#: What each privacy mode protects, for the summary (privacy=central is client-level DP, not
#: centralized training, which is num_clients=1).
PRIVACY_MEANING = {
    "none": "no DP",
    "local": "record-level DP-SGD",
    "central": "client-level DP-FedAvg",
    "local_central": "record- and client-level DP",
}


def summary_table(summary: dict, run_dir: Path) -> Table:
    table = Table(title=f"fedpriv run — {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    test = summary["test"]
    interval = summary["test_ci95"].get("auroc")
    ci = f" (95% CI {_fmt(interval[0])} – {_fmt(interval[1])})" if interval else ""
    table.add_row("test AUROC", f"{_fmt(test['auroc'])}{ci}")
    table.add_row("test AUPRC", _fmt(test["auprc"]))
    table.add_row("test accuracy / sens / spec", " / ".join(_fmt(test[k]) for k in ("accuracy", "sensitivity", "specificity")))
    threshold = summary.get("threshold")
    if threshold:
        how = f"{threshold['rule']} on validation" if threshold["chosen_on"] else "fixed"
        table.add_row("decision threshold", f"{_fmt(threshold['value'])} ({how})")
    for name, metrics in (summary.get("external") or {}).items():
        table.add_row(f"external {name}: AUROC / sens / spec", " / ".join(_fmt(metrics[k]) for k in ("auroc", "sensitivity", "specificity")))
    for name, report in (summary["fairness"] or {}).items():
        table.add_row(f"{name}: worst-group AUROC / SPD / EOD", " / ".join(
            _fmt(report[k]) for k in ("worst_group_auroc", "spd", "equalized_odds_difference")))
    privacy = summary["privacy"]
    table.add_row("privacy", f"{privacy['mode']} ({PRIVACY_MEANING.get(privacy['mode'], privacy['mode'])})")
    if "hospitals" in privacy:
        table.add_row("ε spent (max over hospitals)", _fmt(privacy["max_epsilon"]))
        table.add_row("δ", f"{privacy['delta']:g}")
        hospitals = privacy["hospitals"]
        if len(hospitals) > SHOWN_HOSPITALS:
            table.add_row("hospitals (each in summary.json)", str(len(hospitals)))
        else:
            for names, cells in _grouped_hospitals(hospitals):
                table.add_row(f"{names}: ε / σ / q / steps", cells)
            for h, p in hospitals.items():
                if "gan" in p:
                    g = p["gan"]
                    table.add_row(f"hospital {h}: GAN ε / σ / q / steps ({g['mechanism']})", _privacy_cells(g))
    if "client_level" in privacy:
        c = privacy["client_level"]
        table.add_row("client-level ε (DP-FedAvg)", _fmt(c["epsilon"]))
        table.add_row("client-level σ / clip / releases", f"{c['noise_multiplier']:.3f} / {c['update_clip_norm']:g} / {c['releases']}")
    if "synthetic" in summary:
        s = summary["synthetic"]
        table.add_row("synthetic", f"{s['mode']} ({s['images']} images, GAN {'with' if s['dp'] else 'WITHOUT'} DP)")
        table.add_row("GAN seconds (slowest hospital)", f"{s['gan_seconds_max']:.1f}")
        table.add_row("train-on-synthetic test AUROC", _fmt(s["tstr_auroc"]))
        table.add_row("Fréchet distance synthetic–real (real–real)", f"{_fmt(s['frechet_distance'])} ({_fmt(s['frechet_distance_real_val_vs_test'])})")
    for warning in [*privacy.get("warnings", []), *([summary["synthetic"]["warning"]] if "warning" in summary.get("synthetic", {}) else [])]:
        table.add_row("[bold red]warning", f"[red]{warning}")
    clients = "1 (centralized)" if summary["num_clients"] == 1 else str(summary["num_clients"])  # one hospital, all data
    table.add_row("hospitals × rounds", f"{clients} × {summary['rounds_completed']}/{summary['rounds']}")
    table.add_row("wall seconds", f"{summary['wall_seconds']:.1f}")
    return table


def _privacy_cells(p: dict) -> str:
    return " / ".join(_fmt(p[k]) for k in ("epsilon", "noise_multiplier", "sample_rate", "steps"))


def _grouped_hospitals(hospitals: dict[str, dict]) -> list[tuple[str, str]]:
    """(`hospital 2` or `hospitals 0–3`, their ε / σ / q / steps): consecutive hospitals with
    the same figures share a row (an iid partition gives every hospital the same)."""
    rows: list[tuple[list[str], str]] = []
    for h, p in hospitals.items():
        cells = _privacy_cells(p)
        if rows and rows[-1][1] == cells:
            rows[-1][0].append(h)
        else:
            rows.append(([h], cells))
    return [(f"hospital {names[0]}" if len(names) == 1 else f"hospitals {names[0]}–{names[-1]}", cells) for names, cells in rows]


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`resume=DIR` continues that run with its own config (DIR/.hydra/config.yaml)."""
    from omegaconf import OmegaConf

    if not isinstance(cfg.resume, str) or not cfg.resume:
        raise FedprivError(f"resume={cfg.resume!r} must be the run directory to continue: resume=PATH")
    saved = Path(cfg.resume) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise FedprivError(f"resume={cfg.resume}: no run config at {saved}; point resume at a run directory")
    others = [o for o in overrides if not o.startswith(("resume=", "hydra."))]
    if others:
        raise FedprivError(f"resume continues a run with its own config; drop the other overrides ({others[0]})")
    original = OmegaConf.load(saved)
    for group in cfg:  # a group that run predates (its config lacks it): today's default, as that run behaved
        if group not in original:
            original[group] = cfg[group]
    original.resume = cfg.resume
    return original


def fail(error: Exception) -> NoReturn:
    """One line on stderr, never wrapped (it may be piped), and exit status 2."""
    console.print(f"[bold red]fedpriv:[/] {escape(str(error))}", soft_wrap=True)
    sys.exit(2)


# an absolute path: Hydra would read a relative one as a Python package when main() is called
# from the `fedpriv` console command rather than run as `python -m fedpriv.simulate`
@hydra.main(config_path=str(CONFIG_DIR), config_name="simulate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from fedpriv import run_log

    run_log.configure(console, verbose=bool(cfg.get("verbose", False)))
    from fedpriv.config import settings_from_config

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.get("resume") is not None:
            cfg, run_dir = resumed_config(cfg, HydraConfig.get().overrides.task), Path(cfg.resume)
            run_log.log_also_to(run_dir / "simulate.log")
        log.info("run directory %s; config:\n%s", run_dir, OmegaConf.to_yaml(cfg).rstrip())
        settings = settings_from_config(cfg)  # before the heavy imports: a bad setting stops in a second
        from fedpriv.experiment import run_experiment
        from fedpriv.outputs import describe_round

        progress = Progress(
            TextColumn("[bold]round {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
        )
        task = progress.add_task("starting hospitals…", total=settings.rounds)

        def on_partition(table: list[dict]) -> None:  # the data and settings are checked: training starts
            run_log.show(progress.console, partition_table(table), "partition")
            progress.start()

        def on_round(line: dict) -> None:
            progress.console.print(describe_round(line, settings.rounds), highlight=False, soft_wrap=True)
            progress.update(task, advance=1, description="training" if line["round"] < settings.rounds else "final evaluation")

        # the runs of a sweep (-m) share one Ray instance and its warm hospital workers, ended at exit
        sweep = HydraConfig.get().mode.name == "MULTIRUN"
        if sweep:
            from fedpriv.internals import release_flower_actors

            atexit.unregister(release_flower_actors)
            atexit.register(release_flower_actors)
        try:
            summary = run_experiment(
                settings, run_dir, on_round, on_partition, overrides=list(HydraConfig.get().overrides.task), keep_warm=sweep
            )
        finally:
            if progress.live.is_started:  # (stopping one never started prints a blank line)
                progress.stop()
    except FedprivError as error:
        log.error("%s", error, extra={"console": False})
        fail(error)
    run_log.show(Console(), summary_table(summary, run_dir), "summary")


def cli() -> None:
    """The command. Hydra's own errors (an unknown option, a misspelt key, override syntax)
    stop it like fedpriv's: one line naming the key and exit status 2, not Hydra's report."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedpriv.settings import config_error

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises them to us instead of printing its report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:
        fail(config_error(error))


if __name__ == "__main__":
    cli()
