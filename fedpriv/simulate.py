"""`python -m fedpriv.simulate k=v ...`: compose the Hydra config and run one simulation."""

from __future__ import annotations

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

from fedpriv.errors import FedprivError

console = Console(stderr=True)


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


def summary_table(summary: dict, run_dir: Path) -> Table:
    table = Table(title=f"fedpriv run — {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["test"].items():
        table.add_row(f"test {key}", _fmt(value))
    if "auroc" in summary["test_ci95"]:
        low, high = summary["test_ci95"]["auroc"]
        table.add_row("test AUROC 95% CI (bootstrap)", f"{_fmt(low)} – {_fmt(high)}")
    for name, report in (summary["fairness"] or {}).items():
        table.add_row(f"{name}: worst-group AUROC / SPD / EOD", " / ".join(
            _fmt(report[k]) for k in ("worst_group_auroc", "spd", "equalized_odds_difference")))
    privacy = summary["privacy"]
    table.add_row("privacy", privacy["mode"])
    if "hospitals" in privacy:
        table.add_row("ε spent (max over hospitals)", _fmt(privacy["max_epsilon"]))
        table.add_row("δ", f"{privacy['delta']:g}")
        hospitals = privacy["hospitals"]
        if len(hospitals) > SHOWN_HOSPITALS:
            table.add_row("hospitals (each in summary.json)", str(len(hospitals)))
        else:
            for h, p in hospitals.items():
                table.add_row(f"hospital {h}: ε / σ / q / steps", " / ".join(_fmt(p[k]) for k in ("epsilon", "noise_multiplier", "sample_rate", "steps")))
                if "gan" in p:
                    g = p["gan"]
                    table.add_row(f"hospital {h}: GAN ε / σ / q / steps ({g['mechanism']})", " / ".join(_fmt(g[k]) for k in ("epsilon", "noise_multiplier", "sample_rate", "steps")))
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
    table.add_row("hospitals × rounds", f"{summary['num_clients']} × {summary['rounds_completed']}/{summary['rounds']}")
    table.add_row("wall seconds", f"{summary['wall_seconds']:.1f}")
    return table


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
    original.resume = cfg.resume
    return original


def fail(error: Exception) -> NoReturn:
    """One line on stderr, never wrapped (it may be piped), and exit status 2."""
    console.print(f"[bold red]fedpriv:[/] {escape(str(error))}", soft_wrap=True)
    sys.exit(2)


@hydra.main(config_path="../configs", config_name="simulate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    for noisy in ("flwr", "alembic", "matplotlib"):  # INFO chatter (Flower's state DB migrations, plot units)
        logging.getLogger(noisy).setLevel(logging.WARNING)  # before the imports below log it
    from fedpriv.settings import settings_from_config

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    progress = Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )

    def on_partition(table: list[dict]) -> None:  # the data and settings are checked: training starts
        progress.console.print(partition_table(table))
        progress.start()

    def on_round(line: dict) -> None:
        eps = f" ε={line['max_epsilon']:.2f}" if line["max_epsilon"] is not None else ""
        eps += f" client ε={line['client_epsilon']:.2f}" if line["client_epsilon"] is not None else ""
        split, auroc = ("test", line["auroc"]) if line["auroc"] is not None else ("val", line["val_auroc"])
        progress.update(progress.task_ids[0], advance=1, description=f"{split} AUROC={auroc:.3f}{eps}")

    try:
        if cfg.get("resume") is not None:
            cfg, run_dir = resumed_config(cfg, HydraConfig.get().overrides.task), Path(cfg.resume)
        settings = settings_from_config(cfg)  # before the heavy imports: a bad setting stops in a second
        from fedpriv.experiment import run_experiment

        progress.add_task("starting hospitals…", total=settings.rounds)
        try:
            summary = run_experiment(settings, run_dir, on_round, on_partition)
        finally:
            if progress.live.is_started:  # (stopping one never started prints a blank line)
                progress.stop()
    except FedprivError as error:
        fail(error)
    Console().print(summary_table(summary, run_dir))


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
