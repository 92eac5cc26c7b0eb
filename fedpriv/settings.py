"""Typed, validated run settings built from the composed Hydra config.

The Hydra tree in `configs/` is the only place defaults live; this module only checks them
and gives them types, so a bad value stops the run before any work with one clear message.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from fedpriv.errors import FedprivError
from fedpriv.metrics import THRESHOLD_RULES, parse_threshold

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BaseDataSettings:
    """What every `data=` entry has: its name, the source that reads it (see
    fedpriv.data.sources), the image edge length (2D: size², volumes: size³), whether
    training applies flips/rotations, and the metadata columns fairness is measured over
    (column -> bin edges; empty = categories)."""

    name: str
    source: str
    image_size: int
    augment: bool
    fairness_attributes: tuple[tuple[str, tuple[float, ...]], ...] = ()


@dataclass(frozen=True, kw_only=True)
class PhantomDataSettings(BaseDataSettings):
    """`data=phantom_mammo` / `phantom_ct`: generated data, split by patient here."""

    num_patients: int
    num_sites: int
    malignant_fraction: float
    class_separation: float
    noise_level: float
    val_fraction: float
    test_fraction: float
    images_per_patient: int = 1  # mammography views per patient (CT: one volume)


@dataclass(frozen=True, kw_only=True)
class FileDataSettings(BaseDataSettings):
    """Options of every source that reads files: the intensity `window` [center, width] in
    the files' units (null = the DICOM window, else the 0.5–99.5 percentile range),
    `volume_fit` (resample | crop) for 3D files, and `skip_unreadable` (false: the first bad
    or repeated file stops the run; true: such items are left out, counted and listed in the
    summary)."""

    window: tuple[float, ...] | None = None
    volume_fit: str = "resample"
    skip_unreadable: bool = False
    # extra test sets, evaluated every round and reported by name (external_name): folders
    # PATH/<class folder>/<files> (image_folder) or manifest CSVs (manifest); no patient ids needed
    external_test: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FolderDataSettings(FileDataSettings):
    """`source: image_folder`: ROOT/<split folder>/<class folder>/<files>, patient ids taken
    from file names by `patient_pattern` (e.g. `data=cbis_ddsm`)."""

    root: str
    splits: tuple[tuple[str, str], ...]
    class_folders: tuple[tuple[str, int], ...]
    patient_pattern: str


@dataclass(frozen=True, kw_only=True)
class ManifestDataSettings(FileDataSettings):
    """`source: manifest`: a CSV of files with label, patient id, optional split, metadata."""

    manifest: str
    root: str | None = None  # file paths are relative to this (null = the CSV's folder)
    columns: tuple[tuple[str, str], ...]  # fedpriv field (path/label/patient_id/split) -> CSV column
    labels: tuple[tuple[str, int], ...]  # label value as written in the CSV -> 1 malignant / 0 benign
    val_fraction: float  # used when the CSV has no split column
    test_fraction: float


@dataclass(frozen=True, kw_only=True)
class NpzDataSettings(BaseDataSettings):
    """`source: npz`: a MedMNIST-format .npz file given by `path`; `skip_unreadable` (true:
    repeated images are left out, counted and listed in the summary; false: the first stops
    the run)."""

    path: str
    labels: tuple[tuple[str, int], ...]
    volume_fit: str = "resample"
    skip_unreadable: bool = False


DataSettings = PhantomDataSettings | FolderDataSettings | ManifestDataSettings | NpzDataSettings
DATA_SETTINGS: dict[str, type] = {
    "phantom_mammo": PhantomDataSettings,
    "phantom_ct": PhantomDataSettings,
    "image_folder": FolderDataSettings,
    "manifest": ManifestDataSettings,
    "npz": NpzDataSettings,
}


@dataclass(frozen=True)
class ModelSettings:
    """A model from timm's registry (fedpriv registers its own DP-friendly ones there);
    `init`: a state-dict or safetensors file to start from; `pretrained`: timm's own weights,
    from the local cache only (nothing downloads at run time)."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    init: str | None = None
    pretrained: bool = False


@dataclass(frozen=True, kw_only=True)
class PriorSettings:
    """`prior=none | phantom | random_process` (configs/prior/): initial weights learned on
    generated images before any private record is touched (ε = 0), cached in `cache_dir`.
    `phantom`: supervised on `num_patients` phantom patients (`class_separation` as the data
    option); `random_process`: SimCLR on dead-leaves and 1/f images (`temperature`). `seed`
    is the prior's own (not the run's), so the runs of a sweep share one prior. Both run
    `steps` steps of `batch_size` with `optimizer` at rate `lr` (one cycle)."""

    name: str
    cache_dir: str = "~/.cache/fedpriv/priors"
    seed: int = 0  # the prior's own seed: every run of a sweep (any run seed) shares one prior
    steps: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None  # sgd (momentum 0.9) | adamw
    lr: float | None = None
    weight_decay: float | None = None
    num_patients: int | None = None  # phantom
    class_separation: float | None = None  # phantom
    temperature: float | None = None  # random_process

    def shape(self) -> dict:
        """What shapes the prior's weights besides its seed (the cache folder does not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("cache_dir", "seed")}


@dataclass(frozen=True)
class PrivacySettings:
    """`none`; `local`: record-level DP-SGD at each hospital (target_epsilon, max_grad_norm,
    budget_epsilon); `central`: client-level DP-FedAvg at the server (client_target_epsilon,
    update_clip_norm) — client-level DP, not centralized training (that is num_clients=1);
    `local_central`: both. `delta` serves both guarantees."""

    mode: str
    delta: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float | None = None
    final_max_grad_norm: float | None = None  # local: clipping norm decays geometrically to it over the run; None = constant
    budget_epsilon: float | None = None  # a hospital's hard cap; None = target_epsilon
    client_target_epsilon: float | None = None
    update_clip_norm: float | None = None  # fixed clipping norm, or the initial one (adaptive)
    clipping: str | None = None  # central: "fixed" or "adaptive" (Andrew et al. 2021)
    target_clipped_quantile: float | None = None  # adaptive: share of updates left unclipped
    clip_norm_lr: float | None = None  # adaptive: geometric learning rate of the clip norm
    grad_sample_mode: str | None = None  # local: "hooks" (per-sample gradients) or "ghost" (norms only)

    @property
    def local(self) -> bool:
        return self.mode in ("local", "local_central")

    @property
    def central(self) -> bool:
        return self.mode in ("central", "local_central")

    @property
    def budget(self) -> float | None:
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


@dataclass(frozen=True)
class PartitionSettings:
    """How training patients are spread over hospitals (`partition=` config group).

    `alpha` is for `dirichlet`, `power` for `quantity`, `column` for `by_column`;
    `min_patients` is the fewest patients a hospital may get (dirichlet, quantity);
    `require_both_classes` refuses a partition that leaves a hospital without a malignant or
    a benign case (otherwise such a hospital is only warned about).
    """

    name: str
    alpha: float | None = None
    power: float | None = None
    column: str | None = None
    min_patients: int = 1
    require_both_classes: bool = False


@dataclass(frozen=True)
class TrainingSettings:
    """Local optimisation at each hospital (batch size is the expected Poisson batch).

    `augmentations`: views per example whose gradients are averaged before DP clipping (De
    et al. 2022); `lr_schedule` runs over the planned steps of the whole run;
    `max_physical_batch_size` splits DP-SGD's Poisson batches into bounded physical ones.
    """

    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    eval_batch_size: int
    augmentations: int
    lr_schedule: str
    max_physical_batch_size: int | None
    freeze: str = "none"  # none | backbone: train only the classifier head (timm's get_classifier)
    freeze_rounds: int | None = None  # with freeze=backbone: frozen in rounds 1..freeze_rounds, then all; null = every round


@dataclass(frozen=True)
class StrategySettings:
    """Aggregation (`strategy=` group): `proximal_mu` for fedprox, `server_lr`/`tau` for
    fedadam and fedyogi, `server_lr`/`server_momentum` for fedavgm; `fraction_train` is the
    share of hospitals sampled per round."""

    name: str
    fraction_train: float
    clients_per_round: int | None = None  # overrides fraction_train when set
    min_available_clients: int | None = None  # hospitals that must be connected; None = all
    proximal_mu: float | None = None
    server_lr: float | None = None
    tau: float | None = None
    server_momentum: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """Server-side evaluation: `bootstrap` resamples for the final 95% intervals;
    per-hospital test subgroups only up to `max_hospital_subgroups` hospitals (beyond, a
    hospital's share of the test split is a handful of patients: noise, not a metric);
    `ema`: null, or the decay of an exponential average of the global weights over rounds,
    which is then the model evaluated and saved (post-processing: no privacy cost);
    `select`: `last` evaluates the test split every round and keeps the last model;
    `best_val` evaluates only the validation split each round, keeps the model of the round
    with the best validation AUROC and touches the test split once, for that model (the ε
    reported is still everything the run spent); `threshold`: the rule that picks each
    evaluated model's decision threshold on the validation split (accuracy, sensitivity,
    specificity and the fairness gaps are at that threshold; see metrics.choose_threshold);
    `tta`: score each image as the mean logit over its 8 rotations and flips (the dihedral
    views; for volumes, of each slice plane) — post-processing, no privacy cost."""

    bootstrap: int
    max_hospital_subgroups: int
    ema: float | None
    select: str
    threshold: str | float
    tta: bool = False


@dataclass(frozen=True)
class AuditSettings:
    """`audit=mia`: a loss-threshold membership-inference attack on the final model, members
    (each hospital's training records) vs non-members (validation and test splits); `confidence` is the
    level of the reported empirical ε lower bound. `audit=none` skips it."""

    name: str
    confidence: float | None = None


AUDITS = ("none", "mia")
SELECTIONS = ("last", "best_val")


@dataclass(frozen=True, kw_only=True)
class SyntheticSettings:
    """`synthetic=none | augment | pretrain` (configs/synthetic/): each hospital trains the
    conditional GAN on its own shard — with DP-SGD on the discriminator unless `dp=false`,
    calibrated to `epsilon_share` × privacy.target_epsilon alone and composed with the
    classifier's DP-SGD into one ε per hospital — and shares `samples_per_class` images per
    class. `augment` mixes `mix_ratio` synthetic images per real image into local training;
    `pretrain` trains the global model on the pooled images (`train_epochs`, `train_lr`, also
    the train-on-synthetic quality check) before the DP rounds. Every pool's label fidelity
    is scored first (fedpriv.synthetic.fidelity); `min_fidelity` (null = off) leaves out the
    images of hospitals whose train-on-synthetic validation AUROC is below it. `prior=phantom`
    starts every hospital's GAN from one trained without DP on public phantom masses for
    `prior_epochs` (fedpriv.synthetic.prior; ε = 0, cached). `federated=true` trains one GAN
    across the hospitals instead: `rounds` rounds of `epochs / rounds` local passes each, the
    server averaging both networks (fedpriv.synthetic.share), the same per-record ε.
    `generator=merf` replaces the GAN: each hospital releases its noisy per-class sums of an
    embedding of the prior's features once (`embedding_dims` random features) and the server
    trains the generator for `generator_steps` to match them (fedpriv.synthetic.merf)."""

    name: str
    dp: bool | None = None
    epsilon_share: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    latent_dim: int | None = None
    width: int | None = None
    max_grad_norm: float | None = None
    samples_per_class: int | None = None
    train_epochs: int | None = None
    train_lr: float | None = None
    mix_ratio: float | None = None  # augment only
    min_fidelity: float | None = None
    prior: str = "none"
    prior_epochs: int | None = None
    federated: bool = False
    rounds: int | None = None  # federated only
    generator: str = "gan"
    embedding_dims: int | None = None  # merf only
    generator_steps: int | None = None  # merf only

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def one_generator(self) -> bool:
        """Whether the pool comes from one generator for the whole federation (the federated
        GAN's, or merf's) rather than one per hospital."""
        return self.federated or self.generator == "merf"


SYNTHETIC_MODES = ("none", "augment", "pretrain")
GENERATORS = ("gan", "merf")
GAN_PRIORS = ("none", "phantom")


@dataclass(frozen=True)
class FaultSettings:
    """Hospitals that fail: `client_timeout` is how long the server waits for a round's
    replies; `min_replies` the fewest hospitals whose update a round needs (fewer: the run
    stops with the cause). `client_failure_rate` / `client_hang_rate` inject hospitals that
    crash, or hang past the timeout, after training (seeded per round and hospital)."""

    client_timeout: float
    min_replies: int
    client_failure_rate: float = 0.0
    client_hang_rate: float = 0.0


@dataclass(frozen=True)
class BackendSettings:
    """Flower simulation backend (Ray): resources per client (they set how many hospitals
    train at once, and torch threads = num_cpus), `ray.init` arguments, and `address`: null
    starts a local Ray instance (or attaches to RAY_ADDRESS when set), `auto` or host:port
    attaches to a running cluster, which is left running afterwards."""

    client_resources: tuple[tuple[str, float], ...]
    init_args: tuple[tuple[str, Any], ...]
    address: str | None = None


@dataclass(frozen=True, kw_only=True)
class LoggerSettings:
    """`logger=none | mlflow | tensorboard` (configs/logger/): the experiment tracker a run
    also reports to — its config, every metrics line and the summary (fedpriv.tracking).
    mlflow: the run is filed under `experiment` in the store at `tracking_uri` (null: a
    SQLite store in the run directory, RUN/mlflow.db); tensorboard: event files in the run
    directory."""

    name: str
    experiment: str | None = None  # mlflow
    tracking_uri: str | None = None  # mlflow


@dataclass(frozen=True)
class RunSettings:
    num_clients: int
    rounds: int
    local_epochs: int
    seed: int
    data: DataSettings
    model: ModelSettings
    privacy: PrivacySettings
    partition: PartitionSettings
    strategy: StrategySettings
    training: TrainingSettings
    evaluation: EvaluationSettings
    audit: AuditSettings
    synthetic: SyntheticSettings
    prior: PriorSettings
    faults: FaultSettings
    backend: BackendSettings
    logger: LoggerSettings
    resume: str | None = None  # a run directory to continue from its last checkpoint
    verbose: bool = False  # the console also shows Flower's and Ray's own output


def run_settings_dict(settings: RunSettings) -> dict:
    """The settings that shape a run's results: what a resumed run must share with the run it
    continues, and what provenance's config digest covers. Where the run reports (`verbose`,
    `logger`) and `resume` do not shape them."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("resume", "verbose", "logger")}


def changed_settings(settings: RunSettings, saved: dict) -> list[str]:
    """The settings (dotted names) in which `settings` differ from a run's saved
    run_settings_dict. A setting the saved run predates counts as unchanged while it keeps
    its default, which is how that run behaved: runs started before an upgrade still resume."""
    changed = []
    for group, value in run_settings_dict(settings).items():
        section = getattr(settings, group)
        if group not in saved:
            if value != _default(RunSettings, group):
                changed.append(group)
        elif isinstance(value, dict) and isinstance(saved[group], dict) and dataclasses.is_dataclass(section):
            changed += [
                f"{group}.{key}"
                for key, v in value.items()
                if (saved[group][key] != v if key in saved[group] else v != _default(type(section), key))
            ]
        elif value != saved[group]:
            changed.append(group)
    return changed


def _default(kind: type, name: str) -> Any:
    """A dataclass field's default (a sentinel no value equals when it has none)."""
    field = next(f for f in dataclasses.fields(kind) if f.name == name)
    return field.default if field.default is not dataclasses.MISSING else dataclasses.MISSING


PRIVACY_MODES = ("none", "local", "central", "local_central")
#: Opacus' per-sample gradient modes: per-layer hooks, or ghost clipping (norms only, two backward passes).
GRAD_SAMPLE_MODES = ("hooks", "ghost")
VOLUME_FITS = ("resample", "crop")
#: The phantom generators hold about this many float32 copies of the images at once.
GENERATOR_COPIES = 8
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine")


#: The groups of settings: each a mapping in the config (`group.key=value`).
GROUPS = (
    "data", "model", "privacy", "partition", "strategy", "training", "evaluation", "audit", "synthetic", "faults", "backend", "logger",
)


def config_error(error: Exception) -> FedprivError:
    """Hydra's or OmegaConf's error (an unknown option, a misspelt key, override syntax, a
    broken interpolation) as one line that names what to change."""
    from hydra.errors import MissingConfigException, OverrideParseException

    first = (str(error).strip() or type(error).__name__).splitlines()[0]
    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return FedprivError(f"{group}={name} is not an option of {group}; choose one of {', '.join(error.options)}")
    if isinstance(error, OverrideParseException):
        return FedprivError(f"{error.override!r} is not a valid override ({first}); write KEY=VALUE")
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key and cause.parent_node is not None:
        return unknown_key(key, list(cause.parent_node.keys()))
    detail = (getattr(cause, "msg", None) or first).splitlines()[0]
    return FedprivError(f"{key}: {detail}" if key else detail)


def unknown_key(key: str, known: list) -> FedprivError:
    """`key` (dotted) is not among `known`, the keys of its group: name the closest one."""
    group, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
    hint = f"did you mean {group + '.' if group else ''}{close[0]}?" if close else f"known keys: {sorted(map(str, known))}"
    return FedprivError(f"{key} is not a setting{' of ' + group if group else ''}; {hint}")


def typed_settings(cfg: DictConfig) -> RunSettings:
    """Resolve, type and validate the composed config (every check that needs no library
    beyond Hydra: fedpriv.config adds those that do); raise FedprivError naming the key."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key or "a required setting"
        raise FedprivError(f"{key} is not set: add {key}=... to the command line") from None
    except OmegaConfBaseException as error:  # e.g. an interpolation to a key that does not exist
        raise config_error(error) from None
    known = [f.name for f in dataclasses.fields(RunSettings)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise unknown_key(unknown[0], known)
    for group in GROUPS:
        if not isinstance(raw.get(group), dict):
            raise FedprivError(f"{group}={raw.get(group)!r} must be a group of settings: {group}=NAME or {group}.KEY=VALUE")
    data_source = raw["data"].get("source")
    if not isinstance(data_source, str) or data_source not in DATA_SETTINGS:
        raise FedprivError(f"data.source={data_source!r} is unknown; choose one of {sorted(DATA_SETTINGS)}")
    settings = RunSettings(
        num_clients=_typed(raw, "num_clients", int),
        rounds=_typed(raw, "rounds", int),
        local_epochs=_typed(raw, "local_epochs", int),
        seed=_typed(raw, "seed", int),
        data=_build(DATA_SETTINGS[data_source], raw["data"], "data"),
        model=_model_settings(raw["model"]),
        privacy=_build(PrivacySettings, raw["privacy"], "privacy"),
        partition=_build(PartitionSettings, raw["partition"], "partition"),
        strategy=_build(StrategySettings, raw["strategy"], "strategy"),
        training=_build(TrainingSettings, raw["training"], "training"),
        evaluation=_build(EvaluationSettings, raw["evaluation"], "evaluation"),
        audit=_build(AuditSettings, raw["audit"], "audit"),
        synthetic=_build(SyntheticSettings, raw["synthetic"], "synthetic"),
        prior=_build(PriorSettings, raw["prior"], "prior"),
        faults=_build(FaultSettings, raw["faults"], "faults"),
        resume=_optional_str(raw, "resume"),
        verbose=_flag(raw, "verbose"),
        backend=_build(BackendSettings, raw["backend"], "backend"),
        logger=_build(LoggerSettings, raw["logger"], "logger"),
    )
    validate(settings)
    return settings


def validate(s: RunSettings) -> None:
    """Check every value a user can get wrong; the message names the key and the fix."""
    _require(s.num_clients >= 1, "num_clients must be at least 1 (num_clients=1: centralized training, one hospital holding all training data)")
    _require(s.rounds >= 1, "rounds must be at least 1")
    _require(s.local_epochs >= 1, "local_epochs must be at least 1")
    _require(s.seed >= 0, "seed must be a non-negative integer")
    p = s.privacy
    _require(p.mode in PRIVACY_MODES, f"privacy.mode={p.mode!r} is unknown; choose one of {PRIVACY_MODES}")
    if p.mode != "none":
        _require(
            p.delta is not None and 0 < p.delta < 1, f"privacy.delta={p.delta} must be strictly between 0 and 1"
        )
    if p.central:
        _require(
            p.client_target_epsilon is not None
            and math.isfinite(p.client_target_epsilon)
            and p.client_target_epsilon > 0,
            f"privacy.client_target_epsilon={p.client_target_epsilon} must be a finite number > 0",
        )
        _require(
            p.update_clip_norm is not None and p.update_clip_norm > 0,
            f"privacy.update_clip_norm={p.update_clip_norm} must be > 0",
        )
        _require(p.clipping in ("fixed", "adaptive"), f"privacy.clipping={p.clipping!r} must be fixed or adaptive")
        if p.clipping == "adaptive":
            _require(
                p.target_clipped_quantile is not None and 0 <= p.target_clipped_quantile <= 1,
                f"privacy.target_clipped_quantile={p.target_clipped_quantile} must be in [0, 1]",
            )
            _require(p.clip_norm_lr is not None and p.clip_norm_lr > 0, f"privacy.clip_norm_lr={p.clip_norm_lr} must be > 0")
    if p.local:
        _require(
            p.target_epsilon is not None and math.isfinite(p.target_epsilon) and p.target_epsilon > 0,
            f"privacy.target_epsilon={p.target_epsilon} must be a finite number > 0 (use privacy=none for no DP)",
        )
        _require(
            p.max_grad_norm is not None and p.max_grad_norm > 0,
            f"privacy.max_grad_norm={p.max_grad_norm} must be > 0",
        )
        _require(
            p.final_max_grad_norm is None or p.final_max_grad_norm > 0,
            f"privacy.final_max_grad_norm={p.final_max_grad_norm} must be > 0 (or null: a constant clipping norm)",
        )
        _require(
            p.budget_epsilon is None or p.budget_epsilon > 0,
            f"privacy.budget_epsilon={p.budget_epsilon} must be > 0 (or null: the target)",
        )
        _require(
            p.grad_sample_mode in GRAD_SAMPLE_MODES,
            f"privacy.grad_sample_mode={p.grad_sample_mode!r} is unknown; choose one of {GRAD_SAMPLE_MODES}",
        )
    part = s.partition
    if part.name == "dirichlet":
        _require(part.alpha is not None and part.alpha > 0, f"partition.alpha={part.alpha} must be > 0")
    if part.name == "quantity":
        _require(part.power is not None and part.power >= 0, f"partition.power={part.power} must be >= 0")
    if part.name == "by_column":
        _require(bool(part.column), "partition.column must name a metadata column, e.g. partition.column=site")
    _require(part.min_patients >= 1, f"partition.min_patients={part.min_patients} must be at least 1")
    t = s.training
    _require(t.batch_size >= 1, f"training.batch_size={t.batch_size} must be at least 1")
    _require(t.eval_batch_size >= 1, f"training.eval_batch_size={t.eval_batch_size} must be at least 1")
    _require(t.lr > 0, f"training.lr={t.lr} must be > 0")
    _require(0 <= t.momentum < 1, f"training.momentum={t.momentum} must be in [0, 1)")
    _require(t.weight_decay >= 0, f"training.weight_decay={t.weight_decay} must be >= 0")
    _require(t.optimizer in OPTIMIZERS, f"training.optimizer={t.optimizer!r} is unknown; choose one of {OPTIMIZERS}")
    _require(t.lr_schedule in LR_SCHEDULES, f"training.lr_schedule={t.lr_schedule!r} is unknown; choose one of {LR_SCHEDULES}")
    _require(t.augmentations >= 1, f"training.augmentations={t.augmentations} must be at least 1 (views per example)")
    _require(
        t.augmentations == 1 or s.data.augment,
        f"training.augmentations={t.augmentations} averages over augmented views, but data.augment=false makes "
        "them identical: set data.augment=true or training.augmentations=1",
    )
    _require(
        t.augmentations == 1 or not p.local or p.grad_sample_mode != "ghost",
        f"training.augmentations={t.augmentations} averages per-view gradients before clipping, which ghost clipping "
        "never materialises: use privacy.grad_sample_mode=hooks or training.augmentations=1",
    )
    m = t.max_physical_batch_size
    _require(
        m is None or (isinstance(m, int) and not isinstance(m, bool) and m >= 1),
        f"training.max_physical_batch_size={m!r} must be an integer ≥ 1 (or null: no split)",
    )
    _require(
        m is None or p.local,
        f"training.max_physical_batch_size={m} splits DP-SGD's Poisson batches, but privacy={p.mode} trains "
        "without them: set it to null",
    )
    st = s.strategy
    _require(0 < st.fraction_train <= 1, f"strategy.fraction_train={st.fraction_train} must be in (0, 1]")
    if st.clients_per_round is not None:
        _require(
            1 <= st.clients_per_round <= s.num_clients,
            f"strategy.clients_per_round={st.clients_per_round} must be between 1 and num_clients={s.num_clients}",
        )
    if st.min_available_clients is not None:
        _require(
            1 <= st.min_available_clients <= s.num_clients,
            f"strategy.min_available_clients={st.min_available_clients} must be between 1 and num_clients={s.num_clients}",
        )
    if st.name == "fedprox":
        _require(
            st.proximal_mu is not None and st.proximal_mu >= 0, f"strategy.proximal_mu={st.proximal_mu} must be >= 0"
        )
    if st.name in ("fedadam", "fedyogi"):
        _require(st.server_lr is not None and st.server_lr > 0, f"strategy.server_lr={st.server_lr} must be > 0")
        _require(st.tau is not None and st.tau > 0, f"strategy.tau={st.tau} must be > 0")
    if st.name == "fedavgm":
        _require(st.server_lr is not None and st.server_lr > 0, f"strategy.server_lr={st.server_lr} must be > 0")
        m = st.server_momentum
        _require(m is not None and 0 <= m < 1, f"strategy.server_momentum={m} must be in [0, 1)")
    _require(s.audit.name in AUDITS, f"audit={s.audit.name!r} is unknown; choose one of {AUDITS}")
    if s.audit.name == "mia":
        c = s.audit.confidence
        _require(c is not None and 0 < c < 1, f"audit.confidence={c} must be strictly between 0 and 1")
    _validate_synthetic(s)
    _validate_prior(s)
    f = s.faults
    _require(f.client_timeout > 0, f"faults.client_timeout={f.client_timeout} must be > 0 seconds")
    _require(1 <= f.min_replies <= s.num_clients, f"faults.min_replies={f.min_replies} must be between 1 and num_clients={s.num_clients}")
    for key, rate in (("client_failure_rate", f.client_failure_rate), ("client_hang_rate", f.client_hang_rate)):
        _require(0 <= rate <= 1, f"faults.{key}={rate} must be a probability in [0, 1]")
    _require(f.client_failure_rate + f.client_hang_rate <= 1, "faults.client_failure_rate + faults.client_hang_rate must be at most 1")
    _validate_backend(s.backend)
    _require(s.evaluation.bootstrap >= 0, f"evaluation.bootstrap={s.evaluation.bootstrap} must be >= 0")
    _require(
        s.evaluation.max_hospital_subgroups >= 0,
        f"evaluation.max_hospital_subgroups={s.evaluation.max_hospital_subgroups} must be >= 0 "
        "(0 = no per-hospital test subgroups)",
    )
    ema = s.evaluation.ema
    _require(ema is None or 0 < ema < 1, f"evaluation.ema={ema} must be a decay strictly between 0 and 1 (or null: no average)")
    try:
        parse_threshold(s.evaluation.threshold)
    except ValueError as error:
        raise FedprivError(f"evaluation.threshold={s.evaluation.threshold!r}: {error}; use {THRESHOLD_RULES}") from None
    _require(s.evaluation.select in SELECTIONS, f"evaluation.select={s.evaluation.select!r} must be one of {', '.join(SELECTIONS)}")
    _require(16 <= s.data.image_size <= 1024, f"data.image_size={s.data.image_size} must be between 16 and 1024")
    d = s.data
    for name, edges in d.fairness_attributes:
        _require(
            isinstance(edges, tuple) and all(_is_number(e) and math.isfinite(e) for e in edges) and list(edges) == sorted(set(edges)),
            f"data.fairness_attributes.{name}={list(edges) if isinstance(edges, tuple) else edges!r} must be increasing bin edges, e.g. [50, 65] ([] = categories)",
        )
    if isinstance(d, PhantomDataSettings):
        dims = 3 if d.source == "phantom_ct" else 2
        need = d.num_patients * d.images_per_patient * d.image_size**dims * 4 * GENERATOR_COPIES
        _require(
            need < 0.5 * _physical_memory(),
            f"data.num_patients={d.num_patients} × images_per_patient={d.images_per_patient} at "
            f"data.image_size={d.image_size} needs about {need / 2**30:.1f} GiB to generate; this machine has "
            f"{_physical_memory() / 2**30:.1f} GiB: lower them",
        )
        _require(d.num_patients >= 10, f"data.num_patients={d.num_patients} must be at least 10")
        _require(d.images_per_patient >= 1, f"data.images_per_patient={d.images_per_patient} must be at least 1")
        _require(d.num_sites >= 1, f"data.num_sites={d.num_sites} must be at least 1")
        _require(0 < d.malignant_fraction < 1, "data.malignant_fraction must be strictly between 0 and 1")
    if isinstance(d, (PhantomDataSettings, ManifestDataSettings)):
        _require(
            d.val_fraction > 0 and d.test_fraction > 0 and d.val_fraction + d.test_fraction < 1,
            "data.val_fraction and data.test_fraction must be > 0 and sum to less than 1",
        )
    if isinstance(d, (FileDataSettings, NpzDataSettings)):
        _require(d.volume_fit in VOLUME_FITS, f"data.volume_fit={d.volume_fit!r} must be one of {VOLUME_FITS}")
    if isinstance(d, FileDataSettings) and d.window is not None:
        _require(
            len(d.window) == 2 and all(_is_number(v) for v in d.window) and d.window[1] > 0,
            f"data.window={list(d.window)} must be [center, width] with width > 0 (or null)",
        )
    if isinstance(d, FileDataSettings):
        kind = "manifest CSVs" if isinstance(d, ManifestDataSettings) else "folders"
        names = [external_name(str(path)) for path in d.external_test]
        _require(
            isinstance(d.external_test, tuple)
            and all(isinstance(path, str) and path for path in d.external_test)
            and len(set(names)) == len(names),
            f"data.external_test={list(d.external_test)} must be a list of {kind} with distinct names "
            "(results are reported by name)",
        )
    if isinstance(d, (ManifestDataSettings, NpzDataSettings)):
        bad = [(k, v) for k, v in d.labels if v not in (0, 1)]
        _require(not bad and bool(d.labels), f"data.labels must map label values to 1 (malignant) or 0 (benign); got {dict(d.labels)}")
    if isinstance(d, ManifestDataSettings):
        missing = [k for k in ("path", "label", "patient_id") if k not in dict(d.columns)]
        _require(not missing, f"data.columns.{missing[0] if missing else ''} is not set; map it to a CSV column")


#: What Ray reserves per hospital: the resources Flower sizes its actor pool by (others, e.g.
#: memory, could leave every actor unschedulable and the simulation waiting).
RAY_RESOURCES = ("num_cpus", "num_gpus")


def _validate_backend(b: BackendSettings) -> None:
    """Resources Flower's actor pool cannot use would leave the simulation waiting forever for
    hospitals that never start (num_cpus=0 divides by zero inside Flower, negatives hang)."""
    resources = dict(b.client_resources)
    for key, value in resources.items():
        _require(key in RAY_RESOURCES, f"backend.client_resources.{key} is not a resource Ray reserves per hospital; use {', '.join(RAY_RESOURCES)}")
        _require(
            _is_number(value) and math.isfinite(value) and value >= 0,
            f"backend.client_resources.{key}={value!r} must be a number ≥ 0",
        )
    cpus = resources.get("num_cpus")
    _require(cpus is not None and cpus > 0, f"backend.client_resources.num_cpus={cpus!r} must be > 0: the CPU cores each hospital uses (e.g. 1 or 0.5)")
    for key in ("num_cpus", "num_gpus"):
        value = dict(b.init_args).get(key)
        _require(
            value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0),
            f"backend.init_args.{key}={value!r} must be a whole number ≥ 0 (or null: what the machine has)",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PRIOR_NAMES = ("none", "phantom", "random_process")
FREEZE_MODES = ("none", "backbone")


def _validate_prior(s: RunSettings) -> None:
    """The prior group, the freeze schedule and the model's starting weights."""
    p, t = s.prior, s.training
    _require(p.name in PRIOR_NAMES, f"prior={p.name!r} is unknown; choose one of {PRIOR_NAMES}")
    if p.name != "none":
        _require(p.seed >= 0, f"prior.seed={p.seed} must be a non-negative integer")
        for key in ("steps", "batch_size") + (("num_patients",) if p.name == "phantom" else ()):
            value = getattr(p, key)
            _require(isinstance(value, int) and value >= 1, f"prior.{key}={value!r} must be an integer ≥ 1")
        for key in ("lr", "weight_decay") + (("class_separation",) if p.name == "phantom" else ("temperature",)):
            value = getattr(p, key)
            _require(value is not None and math.isfinite(value) and value >= 0, f"prior.{key}={value!r} must be a number ≥ 0")
        _require(p.lr > 0, f"prior.lr={p.lr} must be > 0")
        _require(p.optimizer in OPTIMIZERS, f"prior.optimizer={p.optimizer!r} must be one of {OPTIMIZERS}")
        if p.name == "random_process":
            _require(p.batch_size >= 2 and p.temperature > 0, "prior.batch_size must be ≥ 2 and prior.temperature > 0 (contrastive pairs)")
        _require(
            s.model.init is None and not s.model.pretrained,
            f"prior={p.name} and model.init / model.pretrained both set the starting weights; keep one",
        )
    _require(not (s.model.init and s.model.pretrained), "model.init and model.pretrained=true both set the starting weights; keep one")
    if s.model.init is not None:
        _require(Path(s.model.init).expanduser().is_file(), f"model.init={s.model.init}: no such file; give a .pt/.pth state dict or a .safetensors file")
    _require(t.freeze in FREEZE_MODES, f"training.freeze={t.freeze!r} must be one of {FREEZE_MODES}")
    if t.freeze_rounds is not None:
        _require(t.freeze == "backbone", "training.freeze_rounds needs training.freeze=backbone")
        _require(1 <= t.freeze_rounds <= s.rounds, f"training.freeze_rounds={t.freeze_rounds} must be between 1 and rounds={s.rounds} (null = every round)")


def external_name(path: str) -> str:
    """The name an external test set is reported by: its folder's name, or its CSV's without .csv."""
    return Path(path).name.removesuffix(".csv")


def _validate_synthetic(s: RunSettings) -> None:
    g = s.synthetic
    _require(g.name in SYNTHETIC_MODES, f"synthetic={g.name!r} is unknown; choose one of {SYNTHETIC_MODES}")
    if not g.enabled:
        return
    for key in ("epochs", "batch_size", "latent_dim", "width", "samples_per_class", "train_epochs"):
        value = getattr(g, key)
        _require(isinstance(value, int) and value >= 1, f"synthetic.{key}={value!r} must be an integer ≥ 1")
    for key in ("lr", "train_lr"):
        _require(getattr(g, key) is not None and getattr(g, key) > 0, f"synthetic.{key}={getattr(g, key)!r} must be > 0")
    _require(g.width % 4 == 0, f"synthetic.width={g.width} must be a multiple of 4 (GroupNorm groups)")
    _require(isinstance(g.dp, bool), f"synthetic.dp={g.dp!r} must be true or false")
    _require(
        g.min_fidelity is None or (_is_number(g.min_fidelity) and 0 <= g.min_fidelity <= 1),
        f"synthetic.min_fidelity={g.min_fidelity!r} must be null (off) or a validation AUROC between 0 and 1, e.g. 0.6",
    )
    _require(g.prior in GAN_PRIORS, f"synthetic.prior={g.prior!r} is unknown; choose one of {', '.join(GAN_PRIORS)}")
    if g.prior != "none":
        _require(
            isinstance(g.prior_epochs, int) and not isinstance(g.prior_epochs, bool) and g.prior_epochs >= 1,
            f"synthetic.prior_epochs={g.prior_epochs!r} must be an integer ≥ 1 (passes over the phantom images)",
        )
    _require(g.generator in GENERATORS, f"synthetic.generator={g.generator!r} is unknown; choose one of {', '.join(GENERATORS)}")
    if g.generator == "merf":
        for key in ("embedding_dims", "generator_steps"):
            value = getattr(g, key)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"synthetic.{key}={value!r} must be an integer ≥ 1 (synthetic.generator=merf)",
            )
        _require(
            not g.federated and g.prior == "none",
            "synthetic.generator=merf sums every hospital's release (federated already) and has no GAN to start from a prior: "
            "set synthetic.federated=false and synthetic.prior=none",
        )
    _require(isinstance(g.federated, bool), f"synthetic.federated={g.federated!r} must be true or false")
    if g.federated:
        _require(
            isinstance(g.rounds, int) and not isinstance(g.rounds, bool) and g.rounds >= 1 and g.epochs % g.rounds == 0,
            f"synthetic.rounds={g.rounds!r} must be an integer ≥ 1 that divides synthetic.epochs={g.epochs} "
            "(each GAN round is epochs / rounds passes over every hospital's shard)",
        )
    if g.name == "augment":
        _require(g.mix_ratio is not None and g.mix_ratio > 0, f"synthetic.mix_ratio={g.mix_ratio!r} must be > 0 (synthetic images per real image)")
    else:
        _require(g.mix_ratio is None, "synthetic.mix_ratio is a setting of synthetic=augment only; drop it")
    if g.dp:
        _require(
            s.privacy.local,
            f"synthetic.dp=true composes the GAN's ε with the classifier's record-level DP, but privacy={s.privacy.mode}: "
            "use privacy=local (or local_central), or set synthetic.dp=false to share non-private synthetic images (ε = ∞)",
        )
        _require(
            g.epsilon_share is not None and 0 < g.epsilon_share < 1,
            f"synthetic.epsilon_share={g.epsilon_share!r} must be strictly between 0 and 1 (the GAN's part of privacy.target_epsilon)",
        )
        _require(g.max_grad_norm is not None and g.max_grad_norm > 0, f"synthetic.max_grad_norm={g.max_grad_norm!r} must be > 0")
    _require(
        s.data.source != "phantom_ct",
        f"synthetic={g.name}: the GAN makes 2D images, but data={s.data.name} holds volumes; use synthetic=none",
    )
    size = s.data.image_size
    _require(
        size & (size - 1) == 0,
        f"synthetic={g.name}: the GAN needs data.image_size to be a power of two (e.g. 64 or 128), not {size}",
    )


def warn_delta(settings: RunSettings, smallest_hospital_records: int) -> None:
    """DP's δ should be well below 1/n; say so (it is legal, but weak)."""
    delta = settings.privacy.delta
    if settings.privacy.local and delta is not None and delta >= 1 / smallest_hospital_records:
        log.warning(
            "privacy.delta=%g is not much smaller than 1/n = %g for the smallest hospital; "
            "the guarantee is weak — consider privacy.delta=%g",
            delta,
            1 / smallest_hospital_records,
            0.1 / smallest_hospital_records,
        )


def _physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FedprivError(message)


def _typed(raw: dict, key: str, kind: type) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FedprivError(f"{key}={value!r} must be of type {kind.__name__}")
    return value


def _model_settings(raw: dict) -> ModelSettings:
    name, kwargs = raw.get("name"), raw.get("kwargs") or {}
    if not isinstance(name, str) or not name:
        raise FedprivError(f"model.name={name!r} must name a model in timm's registry (see configs/model/)")
    if not isinstance(kwargs, dict):
        raise FedprivError(f"model.kwargs={kwargs!r} must be a mapping of timm.create_model arguments")
    unknown = sorted(set(raw) - {"name", "kwargs", "init", "pretrained"})
    if unknown:
        raise FedprivError(f"model.{unknown[0]} is not a setting of model; known keys: ['init', 'kwargs', 'name', 'pretrained']")
    init = raw.get("init")
    if init is not None and (not isinstance(init, str) or not init):
        raise FedprivError(f"model.init={init!r} must be the path of a weights file (or null)")
    pretrained = raw.get("pretrained", False)
    if not isinstance(pretrained, bool):
        raise FedprivError(f"model.pretrained={pretrained!r} must be true or false")
    return ModelSettings(name=name, kwargs=_freeze(kwargs), init=init, pretrained=pretrained)


def _flag(raw: dict, key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise FedprivError(f"{key}={value!r} must be true or false")
    return value


def _optional_str(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise FedprivError(f"{key}={value!r} must be a path (or null)")
    return value


def _freeze(value: Any) -> Any:
    """Dicts/lists from the config become sorted tuples, so settings are hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _build(kind: type, raw: dict, group: str) -> Any:
    """Build a settings dataclass from a config group, naming unknown or missing keys."""
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise unknown_key(f"{group}.{unknown[0]}", list(names))
    required = [n for n, f in names.items() if f.default is dataclasses.MISSING and n not in raw]
    if required:
        raise FedprivError(f"{group}.{required[0]} is missing from the config; add {group}.{required[0]}=...")
    values = {}
    for name, value in raw.items():
        expected = names[name].type
        if expected in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FedprivError(f"{group}.{name}={value!r} must be a number")
        if expected.startswith("bool") and not isinstance(value, bool) and not (value is None and "None" in expected):
            raise FedprivError(f"{group}.{name}={value!r} must be true or false")
        if expected.startswith("str") and not isinstance(value, str) and not (value is None and "None" in expected):
            raise FedprivError(f"{group}.{name}={value!r} must be a string")
        if expected.startswith("int") and value is not None:  # also `int | None`
            if isinstance(value, bool) or not isinstance(value, int):
                raise FedprivError(f"{group}.{name}={value!r} must be an integer")
        if expected.startswith("tuple[tuple[") and not isinstance(value, dict):
            raise FedprivError(f"{group}.{name}={value!r} must be a mapping: {group}.{name}.KEY=VALUE")
        if expected.startswith("tuple[") and not expected.startswith("tuple[tuple[") and value is not None and not isinstance(value, list):
            raise FedprivError(f"{group}.{name}={value!r} must be a list, e.g. {group}.{name}=[a,b]")
        if expected.startswith("float") and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FedprivError(f"{group}.{name}={value!r} must be a number")
            value = float(value)
        values[name] = _freeze(value)
    return kind(**values)
