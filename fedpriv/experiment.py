"""One simulated study end to end: data → partition → federated rounds → outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedpriv.audit import audit_federation
from fedpriv.client import HospitalTrainer
from fedpriv.data.partition import hospital_test_patients, partition_by_patient, partition_table
from fedpriv.data.records import SplitData, concat_records
from fedpriv.data.sources import load_splits
from fedpriv.errors import FedprivError
from fedpriv.metrics import parse_threshold
from fedpriv.models import build_model
from fedpriv.federation import Federation, build_client_app, build_server_app, check_backend, run_federation
from fedpriv.outputs import RunDirectory
from fedpriv.priors.start import starting_weights
from fedpriv.privacy.accounting import epsilon_spent
from fedpriv.provenance import provenance
from fedpriv.records import Summary
from fedpriv.privacy.plan import central_noise_multiplier, classifier_mechanism, gan_mechanism
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.checkpoint import Checkpoint
from fedpriv.privacy.hospital_state import is_gan_round
from fedpriv.server import PRETRAINED_FILE, final_intervals, global_model, initial_weights, run_rounds
from fedpriv.synthetic.pool import FEDERATED_GAN, SyntheticPool
from fedpriv.synthetic.quality import synthetic_quality, train_on_synthetic
from fedpriv.tracking import tracking
from fedpriv.synthetic.share import FIDELITY_FILE, POOL_FILE, SYNTHETIC_DIR, hospital_facts, made_by
from fedpriv.settings import RunSettings, changed_settings, run_settings_dict, warn_delta
from fedpriv.strategies import build_strategy, clients_per_round
from fedpriv.privacy.ledger import FEDERATION

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger(__name__)

#: Where the simulated hospitals keep their own privacy state ("their own disks").
HOSPITAL_STATE_DIR = "hospitals"


def run_experiment(
    settings: RunSettings,
    run_dir: Path,
    on_round: Callable[[dict], None] = lambda line: None,
    on_partition: Callable[[list[dict]], None] = lambda table: None,
    *,
    grid: Grid | None = None,
    overrides: list[str] | None = None,
    keep_warm: bool = False,
) -> dict:
    """Run the configured federation; write every output into run_dir, and report to the
    tracker of settings.logger; return the summary.

    `on_partition` sees the partition table before training, `on_round` each metrics line.
    `grid`: None starts Flower's simulation engine for this run (`fedpriv simulate`); a Grid
    is the one of a ServerApp Flower already runs (`flwr run`, fedpriv.flower_app), whose
    nodes are the hospitals. `overrides` (the Hydra overrides that made `settings`) go into
    the summary's provenance. `keep_warm`: leave Ray and the hospitals' workers running for
    the next run of a sweep (fedpriv.federation.run_federation).
    """
    started = time.perf_counter()
    origin = provenance(settings, overrides)
    with RunDirectory(run_dir).exclusive() as run:  # one writer per run directory, to the end
        checkpoint = resume_point(settings, run)
        plan = prepare(settings)
        splits, shards, table = plan.splits, plan.shards, plan.table
        strategy = run_strategy(settings)
        run.write_json("partition.json", table)
        run.plot_partition(table)
        on_partition(table)
        resumed_after = None if settings.resume is None else checkpoint.round if checkpoint is not None else 0
        if settings.resume is not None:  # drop lines the kill left without a checkpoint
            run.rewrite_metrics(checkpoint.lines if checkpoint is not None else [])
        if checkpoint is not None:
            ledger = PrivacyLedger.from_dict(checkpoint.ledger)
        else:
            ledger = PrivacyLedger(delta=settings.privacy.delta if settings.privacy.delta is not None else 0.0)
        trainer = HospitalTrainer(settings, str(run.path / HOSPITAL_STATE_DIR))
        result: dict = {}
        with tracking(settings.logger, run.path, run_settings_dict(settings), origin, resumed_after) as tracker:

            def on_line(line: dict) -> None:
                tracker.log_round(line)
                on_round(line)

            def server_main(federation) -> None:
                result["lines"], result["weights"], result["final"] = run_rounds(federation, settings, splits, run, ledger, on_line, checkpoint)

            federation = (strategy, settings.num_clients, settings.faults.client_timeout, settings.privacy.central, settings.seed)
            if grid is None:
                run_federation(
                    build_server_app(server_main, *federation),
                    build_client_app(lambda context: trainer),
                    settings.num_clients,
                    settings.backend,
                    settings.verbose,
                    keep_warm,
                )
            else:
                server_main(Federation(grid, *federation))
            if "lines" not in result:
                raise FedprivError("the simulation stopped before all rounds finished; see the log above")
            lines = result["lines"]
            run.plot_rounds(lines)
            run.plot_privacy_utility(lines)
            intervals = final_intervals(settings, result["weights"], splits)
            summary = make_summary(settings, lines, result["final"], ledger, table, intervals, time.perf_counter() - started, splits.skipped)
            if settings.synthetic.enabled:
                summary["synthetic"] = synthetic_summary(settings, run.path, splits, result["weights"])
            if settings.audit.name == "mia":
                summary["audit"] = run_audit(settings, result["weights"], splits, shards, summary["privacy"])
            summary["provenance"] = origin
            summary = Summary(**summary).to_dict()
            tracker.log_summary(summary, run.write_json("summary.json", summary))
    return summary


def run_strategy(settings: RunSettings):
    """The configured Flower strategy, with client-level DP's σ calibrated for the planned rounds."""
    sigma = central_noise_multiplier(settings) if settings.privacy.central else None
    return build_strategy(settings.strategy, settings.privacy, settings.num_clients, sigma)


@dataclass
class Plan:
    """What a run trains on, fixed before any training: splits (the test split carries each
    hospital's own test patients), each hospital's rows, and the partition table."""

    splits: SplitData
    shards: list
    table: list[dict]


def prepare(settings: RunSettings) -> Plan:
    """Load and check the data, partition it and check the privacy plan; all the work before
    training, so that every bad setting or file stops here with one clear message."""
    check_backend(settings.backend)
    splits = load_splits(settings.data, settings.seed)
    splits.check_disjoint_patients(f"data={settings.data.name}")
    for name, edges in settings.data.fairness_attributes:
        if name not in splits.test.metadata:
            raise FedprivError(
                f"data.fairness_attributes: {name!r} is not in the metadata of data={settings.data.name} "
                f"(has: {sorted(splits.test.metadata)})"
            )
        if edges and not np.issubdtype(splits.test.metadata[name].dtype, np.number):
            raise FedprivError(f"data.fairness_attributes.{name}: bin edges for a column of categories; set it to []")
    check_model_fits_data(settings, splits.train.images[:1])
    if settings.synthetic.enabled and splits.train.images.ndim != 4:
        raise FedprivError(f"synthetic={settings.synthetic.name}: the GAN makes 2D images, but data={settings.data.name} holds volumes; use synthetic=none")
    if splits.skipped:
        log.warning("%d unreadable items were left out (data.skip_unreadable=true):\n%s", len(splits.skipped), "\n".join(splits.skipped))
    shards = partition_by_patient(splits.train, settings.num_clients, settings.partition, settings.seed)
    table = partition_table(splits.train, shards)
    if 1 < settings.num_clients <= settings.evaluation.max_hospital_subgroups:
        # each hospital's own test patients, evaluated as a subgroup; with more hospitals a
        # share of the test split is a handful of patients, so per-hospital metrics are noise
        hospitals = hospital_test_patients(splits.train, shards, splits.test, settings.partition, settings.seed)
        test = dataclasses.replace(splits.test, metadata={**splits.test.metadata, "hospital": hospitals})
        splits = dataclasses.replace(splits, test=test)
        for row in table:
            row["test_images"] = int((hospitals == f"h{row['hospital']}").sum())
    one_class = [row for row in table if row["malignant"] == 0 or row["benign"] == 0]
    if one_class and settings.partition.require_both_classes:
        row = one_class[0]
        raise FedprivError(
            f"partition={settings.partition.name} leaves hospital {row['hospital']} with "
            f"{row['malignant']} malignant and {row['benign']} benign images, and "
            "partition.require_both_classes=true: lower num_clients, raise partition.alpha, "
            "or set partition.require_both_classes=false"
        )
    if one_class:  # one line, however many hospitals (the full table is in partition.json)
        log.warning(
            "%d of %d hospitals hold only one class (first: %s)", len(one_class), len(table), one_class[0]
        )
    if settings.privacy.local:
        warn_delta(settings, min(row["images"] for row in table))
        check_budget_allows_one_round(settings, table)
    # the starting weights (a prior is computed, or read from its cache, here, before any
    # hospital starts; a bad model.init file stops the run here)
    starting_weights(settings.model, settings.prior, settings.data.image_size, settings.seed)
    return Plan(splits, shards, table)


def resume_point(settings: RunSettings, run: RunDirectory) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (None: from round 1); a new run refuses a
    directory that already holds a run, whose hospitals' privacy state it would inherit."""
    held = (run.path / HOSPITAL_STATE_DIR).exists() or (run.path / "metrics.jsonl").exists()
    if settings.resume is None:
        if held:
            raise FedprivError(f"{run.path} already holds a run; continue it with resume={run.path} or use a new directory")
        return None
    if (run.path / "summary.json").exists():
        raise FedprivError(f"resume={settings.resume}: that run already finished (summary.json exists)")
    checkpoint = Checkpoint.load(run.path)
    if checkpoint is not None:
        differing = changed_settings(settings, checkpoint.settings)
        if differing:
            raise FedprivError(
                f"resume={settings.resume}: the config differs from the run being resumed in {differing[0]!r}; "
                "resume with the run's own config"
            )
        log.info("resuming %s after round %d", run.path, checkpoint.round)
    return checkpoint


def run_audit(settings: RunSettings, weights: dict, splits, shards, privacy: dict) -> dict:
    """Membership inference on the final model, next to the ε that was accounted for it."""
    audit = audit_federation(
        global_model(settings, weights),
        splits.train,
        shards,
        concat_records([splits.val, splits.test]),
        settings.privacy.delta if settings.privacy.delta is not None else 0.0,
        settings.audit.confidence,
        settings.training.eval_batch_size,
        settings.seed,
    )
    audit["accounted_epsilon"] = privacy.get("max_epsilon", math.inf)  # record-level; ∞ without local DP
    return audit


def check_model_fits_data(settings: RunSettings, example) -> None:
    """Fail before any work when the model cannot take the data's shape (2D vs 3D)."""
    model = build_model(settings.model, settings.data.image_size)
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(example))
    except (RuntimeError, ValueError, AssertionError) as error:
        kind = "3D volumes" if example.ndim == 5 else "2D images"
        raise FedprivError(
            f"model.name={settings.model.name} cannot take data={settings.data.name} ({kind} of shape "
            f"{tuple(example.shape[1:])}): {str(error).splitlines()[0]}; pick a model for {kind} (see configs/model/)"
        ) from None


def check_budget_allows_one_round(settings: RunSettings, table: list[dict]) -> None:
    """Refuse, before any work, a budget that no hospital could spend a single round in.

    Hospitals enforce their budget themselves every round; this only saves a useless run.
    """
    p = settings.privacy
    for n in sorted({row["images"] for row in table}):
        gan = gan_mechanism(settings, n)
        before = [gan.entry] if gan is not None and gan.noise_multiplier > 0 else []
        one_round = epsilon_spent([*before, classifier_mechanism(settings, n).entry], p.delta)
        if one_round > p.budget:
            spent_on = "its GAN and one round" if before else "one round"
            raise FedprivError(
                f"privacy.budget_epsilon={p.budget} is below what {spent_on} costs (ε={one_round:.3f} for a "
                f"hospital of {n} images); raise it, or lower local_epochs"
            )


def _mechanism_facts(ledger: PrivacyLedger, hospital: int, mechanism: str) -> dict:
    entries = [e for e in ledger.entries_of(hospital) if e.mechanism == mechanism]
    return {
        "noise_multiplier": entries[0].noise_multiplier if entries else None,
        "sample_rate": entries[0].sample_rate if entries else None,
        "steps": sum(e.steps for e in entries),
    }


def synthetic_summary(settings: RunSettings, run_dir: Path, splits: SplitData, weights: dict) -> dict:
    """What the GANs cost (wall time per hospital) and how good their images are: TSTR AUROC
    and feature Fréchet distances (fedpriv.synthetic.quality)."""
    folder = Path(run_dir) / SYNTHETIC_DIR
    pool = SyntheticPool.load(folder / POOL_FILE)
    pretrained = Path(run_dir) / PRETRAINED_FILE
    if pretrained.exists():  # synthetic=pretrain: the pretrained model is the train-on-synthetic model
        on_synthetic = torch.load(pretrained, weights_only=True)
    else:
        on_synthetic = train_on_synthetic(settings, initial_weights(settings, splits.val), pool)
    quality = synthetic_quality(settings, pool, splits, global_model(settings, weights), global_model(settings, on_synthetic))
    facts = hospital_facts(run_dir)
    one = settings.synthetic.one_generator
    # each hospital's share of the work (the federated GAN: summed over its rounds)
    seconds = facts[str(FEDERATED_GAN)]["hospital_seconds"] if one else {h: f["gan_seconds"] for h, f in facts.items()}
    made = made_by(FEDERATED_GAN) if one else "hospital_<k>"
    block = {
        "mode": settings.synthetic.name,
        "dp": settings.synthetic.dp,
        "generator": settings.synthetic.generator,
        "federated": settings.synthetic.federated,
        "images": len(pool),
        "malignant": int(pool.labels.sum()),
        "gan_seconds": seconds,
        "gan_seconds_max": max(seconds.values()),
        **quality,
        "fidelity": json.loads((folder / FIDELITY_FILE).read_text()),
        "files": {"pool": f"{SYNTHETIC_DIR}/{POOL_FILE}", "fidelity": f"{SYNTHETIC_DIR}/{FIDELITY_FILE}", "generators": f"{SYNTHETIC_DIR}/generator_{made}.pt",
                  "samples": f"{SYNTHETIC_DIR}/samples_{made}.png"},
    }
    if not settings.synthetic.dp:
        block["warning"] = "the GANs were trained without DP (synthetic.dp=false): every hospital's ε is ∞"
    return block


def make_summary(
    settings: RunSettings,
    lines: list[dict],
    final: dict,
    ledger: PrivacyLedger,
    table: list[dict],
    intervals: dict,
    wall: float,
    skipped: tuple[str, ...],
) -> dict:
    """The summary.json payload (schema in README); `final` is the final model's evaluation
    (its round under `round`)."""
    utility_keys = ("auroc", "auprc", "accuracy", "sensitivity", "specificity")
    hospitals = [row["hospital"] for row in table]
    privacy: dict = {"mode": settings.privacy.mode}
    if ledger.public:  # how the starting weights were made, touching no private record (ε = 0)
        privacy["public_steps"] = [dict(step) for step in ledger.public]
    if settings.privacy.central:
        releases = ledger.entries_of(FEDERATION)
        privacy["client_level"] = {
            "epsilon": ledger.client_level_epsilon(),
            "target_epsilon": settings.privacy.client_target_epsilon,
            "delta": settings.privacy.delta,
            "noise_multiplier": central_noise_multiplier(settings),
            "update_clip_norm": settings.privacy.update_clip_norm,
            "clipping": settings.privacy.clipping,
            "clients_per_round": clients_per_round(settings.strategy, settings.num_clients),
            "releases": len(releases),
        }
    if settings.privacy.local:
        per_hospital = {}
        for h in hospitals:
            per_hospital[str(h)] = {"epsilon": ledger.epsilon(h), **_mechanism_facts(ledger, h, "dp-sgd")}
            gan = [e for e in ledger.entries_of(h) if is_gan_round(e.round)]
            if gan:  # the GAN's own part; "epsilon" above covers GAN and classifier together
                per_hospital[str(h)]["gan"] = {
                    "mechanism": gan[0].mechanism,
                    "epsilon": ledger.epsilon(h, mechanism=gan[0].mechanism),
                    **_mechanism_facts(ledger, h, gan[0].mechanism),
                }
                per_hospital[str(h)]["classifier_epsilon"] = ledger.epsilon(h, mechanism="dp-sgd")
        privacy.update(
            accountant="rdp",
            target_epsilon=settings.privacy.target_epsilon,
            budget_epsilon=settings.privacy.budget,
            delta=settings.privacy.delta,
            max_grad_norm=settings.privacy.max_grad_norm,
            final_max_grad_norm=settings.privacy.final_max_grad_norm,
            max_epsilon=max(v["epsilon"] for v in per_hospital.values()),
            hospitals=per_hospital,
        )
        unprotected = [h for h, v in per_hospital.items() if v.get("gan", {}).get("mechanism") == "gan-without-dp"]
        if unprotected:
            privacy["warnings"] = [
                f"hospitals {', '.join(unprotected)} shared images from a GAN trained without DP "
                "(synthetic.dp=false): their ε is ∞; classifier_epsilon is the classifier's DP-SGD alone"
            ]
    return {
        "test": {k: final[k] for k in utility_keys},
        "test_ci95": intervals,
        "fairness": final["fairness"],
        "val": {k: final[f"val_{k}"] for k in utility_keys},
        "external": {name: {k: m[k] for k in utility_keys} for name, m in (final["external"] or {}).items()} or None,
        "selection": {"rule": settings.evaluation.select, "round": final["round"]},
        # accuracy, sensitivity, specificity and the fairness gaps are at this threshold
        "threshold": {
            "rule": str(settings.evaluation.threshold),
            "value": final.get("threshold"),
            "chosen_on": None if parse_threshold(settings.evaluation.threshold)[0] == "fixed" else "val",
        },
        "privacy": privacy,
        "num_clients": settings.num_clients,
        "rounds": settings.rounds,
        "rounds_completed": len(lines),
        "local_epochs": settings.local_epochs,
        "seed": settings.seed,
        "model": settings.model.name,
        "data": settings.data.name,
        "data_skipped": {"count": len(skipped), "items": list(skipped)},
        "failures": {
            "count": sum(len(line["hospitals_failed"]) for line in lines),
            "rounds": {str(line["round"]): line["hospitals_failed"] for line in lines if line["hospitals_failed"]},
        },
        "partition": table,
        "settings": dataclasses.asdict(settings),
        "wall_seconds": wall,
    }
