"""`python -m fedpriv.data check data=… data.root=…`: read every record and report, no training.

Exit status: 0 when everything is readable and consistent, 1 when problems were found,
2 when the settings themselves are wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.markup import escape
from rich.table import Table

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
USAGE = "usage: python -m fedpriv.data check data=NAME [data.KEY=VALUE ...]"


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedpriv.data.check import check_data
    from fedpriv.errors import FedprivError
    from fedpriv.settings import config_error, settings_from_config

    console = Console()
    if not argv or argv[0] != "check":
        console.print(USAGE)
        return 2
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            settings = settings_from_config(compose("simulate", overrides=argv[1:]))
    except (HydraException, OmegaConfBaseException) as error:  # unknown option, misspelt key, override syntax
        return _fail(console, config_error(error))
    except FedprivError as error:
        return _fail(console, error)
    report = check_data(settings.data, settings.seed)
    table = Table(title=f"data={settings.data.name}: records per split (item shape {report.shape})")
    for column in ("split", "images", "patients", "malignant", "benign", "images per site"):
        table.add_column(column, justify="right")
    for split, counts in report.counts.items():
        sites = ", ".join(f"{k}: {v}" for k, v in report.sites.get(split, {}).items()) or "—"
        table.add_row(split, *(str(counts[k]) for k in ("images", "patients", "malignant", "benign")), sites)
    if report.counts:
        console.print(table)
    if report.problems:
        console.print(f"[bold red]{len(report.problems)} problem(s):[/]")
        for message in report.problems:
            console.print(f"  • {message}", soft_wrap=True)
        return 1
    console.print("[green]every record is readable and consistent[/]")
    return 0


def _fail(console: Console, error: Exception) -> int:
    console.print(f"[bold red]fedpriv:[/] {escape(str(error))}", soft_wrap=True)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
