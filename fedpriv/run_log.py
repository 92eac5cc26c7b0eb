"""Where a simulation's messages go: the console shows fedpriv's own lines and warnings, the
run directory's `simulate.log` (Hydra's file handler, configs/hydra/job_logging/) keeps
everything fedpriv logs — config, partition, rounds, summary, warnings — and Flower's INFO.

`verbose=true` adds the engines' own output to the console: Flower's INFO and DEBUG lines and
the Ray workers' logs (the hospitals' stdout and warnings).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from rich.console import Console, RenderableType
from rich.logging import RichHandler

#: Libraries whose INFO lines are chatter even in the log file (Flower's and MLflow's
#: state-DB migrations, matplotlib's unit conversions).
CHATTY = ("alembic", "matplotlib", "mlflow")

log = logging.getLogger("fedpriv")


class FedprivChoices(logging.Filter):
    """Drops the Flower warnings that describe what fedpriv chose on purpose: it evaluates the
    global model on the server (no federated evaluation), and it runs Flower's simulation
    engine through `run_simulation`, which Flower marks deprecated in favour of `flwr run`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("fraction_evaluate is set to 0.0") or "`run_simulation` function is deprecated" in message)


def _for_console(record: logging.LogRecord) -> bool:
    """Records logged with extra={"console": False} go to the log file only (the CLI shows
    them its own way)."""
    return getattr(record, "console", True)


def configure(console: Console, verbose: bool) -> None:
    """Route Flower's and fedpriv's records to the console (WARNING and above; everything with
    `verbose`) and, through the root logger, to simulate.log; Python warnings are logged too."""
    from flwr.common.logger import console_handler as flower_console  # importing flwr resets its level

    flower = logging.getLogger("flwr")
    flower.removeHandler(flower_console)  # its records reach the console once, through the root logger
    flower.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(f, FedprivChoices) for f in flower.filters):
        flower.addFilter(FedprivChoices())
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, RichHandler)]:
        root.removeHandler(handler)  # a sweep configures every job again
    handler = RichHandler(console=console, level=logging.DEBUG if verbose else logging.WARNING,
                          show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    handler.addFilter(_for_console)
    root.addHandler(handler)
    logging.captureWarnings(True)  # Python warnings become log records (console and file)


def log_also_to(path: Path) -> None:
    """Append the log to `path` too, formatted as simulate.log is (a resumed run's own
    simulate.log goes on, besides the new Hydra folder's)."""
    root = logging.getLogger()
    hydra_file = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    handler = logging.FileHandler(path)
    if hydra_file is not None:
        handler.setFormatter(hydra_file.formatter)
    root.addHandler(handler)


#: simulate.log's line format (configs/hydra/job_logging/fedpriv.yaml, Hydra's file handler).
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def configure_flower_run(run_dir: Path) -> None:
    """Under `flwr run` (fedpriv.flower_app's ServerApp): fedpriv's lines, once each, to
    stderr, which Flower collects for `flwr run --stream` and `flwr log`, and with Flower's
    INFO lines to the run directory's simulate.log, as `fedpriv simulate` keeps it."""
    fedpriv = logging.getLogger("fedpriv")
    fedpriv.setLevel(logging.INFO)
    fedpriv.propagate = False  # not again through a root handler (importing Opacus adds one)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s fedpriv: %(message)s"))
    file = logging.FileHandler(run_dir / "simulate.log")
    file.setLevel(logging.INFO)
    file.setFormatter(logging.Formatter(FILE_FORMAT))
    for logger, handler in ((fedpriv, console), (fedpriv, file), (logging.getLogger("flwr"), file)):
        logger.addHandler(handler)


def render(renderable: RenderableType, width: int = 100) -> str:
    """A rich table as plain text, for the log file."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, legacy_windows=False).print(renderable)
    return buffer.getvalue().rstrip()


def show(console: Console, renderable: RenderableType, title: str) -> None:
    """Print a table on the console and write it, as text, into the log."""
    console.print(renderable)
    log.info("%s\n%s", title, render(renderable))
