"""fedpriv as a Flower App: `flwr run .` runs the run `fedpriv simulate` runs, with Flower's
runtime in charge (pyproject.toml, `[tool.flwr.app]`, names `server_app` and `client_app`).

A Flower run's config (`[tool.flwr.app.config]`, changed with `flwr run --run-config`) holds
`overrides`, the Hydra overrides `fedpriv simulate` would take (same composed config, same
seed, same metrics and ε), and `run-dir`, the run directory. The ServerApp and every ClientApp
compose the config from it themselves; a hospital's node is its `partition-id`, and the
federation must have num_clients nodes (`num-partitions`).
"""

from __future__ import annotations

import functools
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedpriv import CONFIG_DIR
from fedpriv.client import HospitalTrainer
from fedpriv.errors import FedprivError
from fedpriv.experiment import HOSPITAL_STATE_DIR, run_experiment
from fedpriv.federation import build_client_app
from fedpriv.run_log import configure_flower_run, render
from fedpriv.config import settings_from_config
from fedpriv.settings import RunSettings, config_error
from fedpriv.simulate import partition_table, resumed_config, summary_table

log = logging.getLogger("fedpriv.flower_app")

#: The run directory when the run config's `run-dir` is empty (relative: to the working
#: directory of the process running the ServerApp, the SuperLink's).
DEFAULT_RUN_DIR = "outputs/flwr/{run_id}"


def run_of(run_config: Mapping, run_id: int) -> tuple[DictConfig, Path]:
    """The composed config and the run directory of the Flower run with this run config.
    `resume=DIR` in `overrides` continues DIR with its own config, as `fedpriv simulate` does."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = shlex.split(str(run_config["overrides"]))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("simulate", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise config_error(error) from None
    if cfg.resume is not None:
        if run_config["run-dir"]:
            raise FedprivError(f"resume={cfg.resume} continues that run in its own directory; leave run-dir empty")
        return resumed_config(cfg, overrides), Path(cfg.resume).resolve()
    return cfg, Path(str(run_config["run-dir"]) or DEFAULT_RUN_DIR.format(run_id=run_id)).resolve()


@functools.lru_cache(maxsize=4)
def _settings(overrides: str, run_dir: str, run_id: int) -> tuple[RunSettings, Path]:
    cfg, path = run_of({"overrides": overrides, "run-dir": run_dir}, run_id)
    return settings_from_config(cfg), path


def hospitals_of(context: Context) -> HospitalTrainer:
    """The ClientApp's work for this run (composed once per worker process): the hospitals'
    privacy state lives in the run directory's hospitals/, as under `fedpriv simulate`."""
    run_config = context.run_config
    settings, run_dir = _settings(str(run_config["overrides"]), str(run_config["run-dir"]), context.run_id)
    nodes = int(context.node_config["num-partitions"])
    if nodes != settings.num_clients:
        raise FedprivError(
            f"num_clients={settings.num_clients} but the federation has {nodes} nodes; give it one per hospital "
            f"(flwr run: --federation-config num-supernodes={settings.num_clients})"
        )
    return HospitalTrainer(settings, str(run_dir / HOSPITAL_STATE_DIR))


client_app = build_client_app(hospitals_of)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the run from its run config, then train, account and write every output as
    `fedpriv simulate` does; a bad setting stops the run with one error line."""
    try:
        cfg, run_dir = run_of(context.run_config, context.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        configure_flower_run(run_dir)
        log.info("run directory %s; config:\n%s", run_dir, OmegaConf.to_yaml(cfg).rstrip())
        settings = settings_from_config(cfg)
        if settings.backend.address is not None:
            raise FedprivError(
                f"backend.address={settings.backend.address} is for `fedpriv simulate`; under flwr run Flower starts "
                "Ray itself: drop it, and size Ray with --federation-config"
            )

        def started(table: list[dict]) -> None:  # the run directory is checked and this run's
            if cfg.resume is None:  # what resume=RUN_DIR reads (`fedpriv simulate` and here)
                (run_dir / ".hydra").mkdir(exist_ok=True)
                OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
            log.info("partition\n%s", render(partition_table(table)))

        overrides = shlex.split(str(context.run_config["overrides"]))
        summary = run_experiment(settings, run_dir, on_partition=started, grid=grid, overrides=overrides)
    except FedprivError as error:
        log.error("%s", error)
        raise
    log.info("summary\n%s", render(summary_table(summary, run_dir)))
