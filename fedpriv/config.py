"""From a composed Hydra config to the run's checked settings: fedpriv.settings types and
validates every value, then the checks that need the libraries run here — the model builds
(timm, on the meta device), client-level DP's σ can be calibrated, the tracker's package is
installed — so that a bad setting stops with one line before any data is read."""

from __future__ import annotations

from omegaconf import DictConfig

from fedpriv.errors import FedprivError
from fedpriv.settings import LoggerSettings, RunSettings, typed_settings
from fedpriv.tracking import LOGGERS, missing_package


def settings_from_config(cfg: DictConfig) -> RunSettings:
    """Resolve, type and check the composed config; raise FedprivError naming the key."""
    settings = typed_settings(cfg)
    check_logger(settings.logger)
    # last: the checks below import torch, timm and Opacus (seconds); those above take none
    check_model_builds(settings)
    if settings.privacy.central:  # needs no data: refused here rather than when the server starts
        from fedpriv.privacy.plan import central_noise_multiplier

        central_noise_multiplier(settings)
    return settings


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FedprivError(message)


def check_logger(g: LoggerSettings) -> None:
    """A known tracker whose package is installed (checked without importing it)."""
    _require(g.name in LOGGERS, f"logger={g.name!r} is unknown; choose one of {LOGGERS}")
    if g.name == "mlflow":
        _require(bool(g.experiment), f"logger.experiment={g.experiment!r} must name the MLflow experiment, e.g. logger.experiment=fedpriv")
        _require(g.tracking_uri is None or bool(g.tracking_uri), "logger.tracking_uri must be a tracking URI (or null: RUN/mlflow.db)")
    else:
        for key in ("experiment", "tracking_uri"):
            _require(getattr(g, key) is None, f"logger.{key} is a setting of logger=mlflow only; drop it")
    package = missing_package(g.name)
    _require(
        package is None,
        f"logger={g.name} needs the {package} package, which is not installed: pip install 'fedpriv[tracking]' (or use logger=none)",
    )


def check_model_builds(s: RunSettings) -> None:
    """A model.name timm does not know, or model.kwargs it does not take, stop here before any
    data is read: the model is built on the meta device (no memory, milliseconds), or on the CPU when an
    operation has no meta version (which then decides)."""
    import torch
    from timm import is_model

    from fedpriv.models import build_model  # also registers fedpriv's models in timm

    _require(is_model(s.model.name), f"model.name={s.model.name!r} is not in timm's registry; see configs/model/")
    try:
        with torch.device("meta"):
            build_model(s.model, s.data.image_size)
    except FedprivError:
        build_model(s.model, s.data.image_size)
