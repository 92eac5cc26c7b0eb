"""The server's rounds: train, aggregate, account, evaluate the global model on the server, record."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpriv.checkpoint import Checkpoint
from fedpriv.data.records import ImageRecords, SplitData
from fedpriv.devices import backend_device
from fedpriv.ema import update_average
from fedpriv.errors import FedprivError
from fedpriv.federation import Federation
from fedpriv.internals import restore_strategy_state, seed_flower_dp_noise
from fedpriv.metrics import auroc, binary_metrics, bootstrap_interval, choose_threshold, fairness_report, subgroup_labels
from fedpriv.models import build_model
from fedpriv.outputs import RunDirectory, describe_round, write_json
from fedpriv.priors.start import starting_weights
from fedpriv.protocol import NUM_EXAMPLES
from fedpriv.records import RoundLine
from fedpriv.privacy.accounting import epsilon_spent
from fedpriv.privacy.hospital_state import history_from_metrics
from fedpriv.privacy.plan import central_noise_multiplier, classifier_mechanism, fits_budget
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.settings import RunSettings, run_settings_dict
from fedpriv.training import predict
from fedpriv.synthetic.quality import train_on_synthetic
from fedpriv.synthetic.fidelity import pool_fidelity, trusted_hospitals
from fedpriv.synthetic.pool import SyntheticPool
from fedpriv.synthetic.prior import gan_prior
from fedpriv.synthetic.share import FIDELITY_FILE, SYNTHETIC_DIR, share_synthetic

#: The global model after synthetic pretraining (synthetic=pretrain), before round 1.
PRETRAINED_FILE = f"{SYNTHETIC_DIR}/pretrained.pt"

log = logging.getLogger(__name__)


def initial_weights(settings: RunSettings, val: ImageRecords | None = None) -> dict[str, torch.Tensor]:
    """The global model before round 1 (`starting_point`'s weights); `val`: the server's
    validation split, which a model with a feature standardization needs."""
    return starting_point(settings, val)[0]


def starting_point(settings: RunSettings, val: ImageRecords | None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The global model before round 1 and the steps that made it, none touching a hospital's
    record: fedpriv.priors.start's start (random, a prior or given weights), then, for a model
    with a feature standardization (model=cnn_scatter), its statistics on the server's
    validation split — the split that already picks the round and the threshold."""
    weights, steps = starting_weights(settings.model, settings.prior, settings.data.image_size, settings.seed)
    model = build_model(settings.model, settings.data.image_size)
    if not hasattr(model, "fit_standardization"):
        return weights, steps
    if val is None:
        raise FedprivError(f"model.name={settings.model.name} standardizes its features on the validation split; none was given")
    model.load_state_dict(weights)
    model.eval().fit_standardization((torch.from_numpy(val.images) - 0.5) / 0.5)
    step = {"mechanism": "validation-standardization", "epsilon": 0.0, "source": "the server's validation split", "records": len(val)}
    if getattr(model, "components", None) is not None:
        step["components"] = model.components  # whitened principal components the head reads
    return model.state_dict(), [*steps, step]


def global_model(settings: RunSettings, weights: dict) -> torch.nn.Module:
    """The global model on the server's device (CUDA when the backend asks for GPUs)."""
    model = build_model(settings.model, settings.data.image_size)
    model.load_state_dict(weights)
    return model.to(backend_device(settings.backend))


def fairness_attributes(settings: RunSettings, splits: SplitData) -> list[tuple[str, tuple[float, ...]]]:
    """The configured metadata attributes, plus `hospital` (each hospital's own test patients)
    when the test split carries it (federations of more than one hospital)."""
    extra = [("hospital", ())] if "hospital" in splits.test.metadata else []
    return [*settings.data.fairness_attributes, *extra]


def evaluate(settings: RunSettings, weights: dict, splits: SplitData, test: bool = True) -> dict:
    """Test metrics (plain names), validation metrics (`val_` prefix) and, per fairness
    attribute, subgroup metrics and gaps on the test split, for the global model, all at the
    decision `threshold` that evaluation.threshold picks on the validation split.
    `test=False`: the validation metrics alone (test, fairness and external keys are None)."""
    model = global_model(settings, weights)
    score = functools.partial(predict, model, batch_size=settings.training.eval_batch_size, tta=settings.evaluation.tta)
    val_scores = score(splits.val)
    threshold = decision_threshold(settings, splits.val.labels, val_scores)
    val = binary_metrics(splits.val.labels, val_scores, threshold)
    if not test:
        return {**dict.fromkeys(val), **{f"val_{k}": v for k, v in val.items()}, "threshold": threshold, "fairness": None, "external": None}
    scores = score(splits.test)
    fairness = {
        name: fairness_report(splits.test.labels, scores, subgroup_labels(splits.test.metadata[name], list(edges)), threshold)
        for name, edges in fairness_attributes(settings, splits)
    }
    external = {
        name: binary_metrics(records.labels, score(records), threshold) for name, records in splits.external.items()
    }
    return {
        **binary_metrics(splits.test.labels, scores, threshold),
        **{f"val_{k}": v for k, v in val.items()},
        "threshold": threshold,
        "fairness": fairness or None,
        "external": external or None,
    }


#: The threshold when the rule cannot pick one (a validation split with one class only).
FALLBACK_THRESHOLD = 0.5


def decision_threshold(settings: RunSettings, labels, scores) -> float:
    """evaluation.threshold applied to the validation scores; 0.5, with a warning, when the
    validation split holds one class only."""
    threshold = choose_threshold(labels, scores, settings.evaluation.threshold)
    if math.isnan(threshold):
        log.warning(
            "evaluation.threshold=%s needs both classes in the validation split, which has one; using %g",
            settings.evaluation.threshold, FALLBACK_THRESHOLD,
        )
        return FALLBACK_THRESHOLD
    return threshold


def final_intervals(settings: RunSettings, weights: dict, splits: SplitData) -> dict:
    """Bootstrap 95% intervals of test AUROC, overall and per subgroup, for the final model."""
    rounds = settings.evaluation.bootstrap
    if rounds == 0:
        return {}
    labels = splits.test.labels
    scores = predict(global_model(settings, weights), splits.test, settings.training.eval_batch_size, settings.evaluation.tta)
    intervals = {"auroc": bootstrap_interval(labels, scores, auroc, rounds, settings.seed)}
    for name, edges in fairness_attributes(settings, splits):
        groups = subgroup_labels(splits.test.metadata[name], list(edges))
        for group in sorted(set(groups.tolist())):
            rows = groups == group
            intervals[f"auroc[{name}={group}]"] = bootstrap_interval(labels[rows], scores[rows], auroc, rounds, settings.seed)
    return intervals


def run_rounds(
    federation: Federation,
    settings: RunSettings,
    splits: SplitData,
    run: RunDirectory,
    ledger: PrivacyLedger,
    on_round: Callable[[dict], None],
    resume_from: Checkpoint | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """All rounds (after `resume_from`'s, when given); returns the metrics lines (also
    appended to metrics.jsonl as they come), the final model and its evaluation (with the
    round it comes from). The final model is the global weights, or their moving average
    under evaluation.ema, of the last round or, under evaluation.select=best_val, of the
    round with the best validation AUROC. A checkpoint is written after every round.

    Each round: sample → send → aggregate (the federation and its strategy), account, apply
    the release, evaluate, record, checkpoint."""
    seed_flower_dp_noise(settings.seed)  # privacy=central
    state = _start(federation, settings, ledger, resume_from, splits.val)
    if settings.synthetic.enabled:
        state.weights = _use_synthetic(federation, settings, run, ledger, state.weights, state.first_round, splits.val)
    for server_round in range(state.first_round, settings.rounds + 1):
        started = time.perf_counter()
        outcome = federation.train_round(server_round, state.weights, {"rounds": settings.rounds})
        if not _account(outcome, server_round, state, federation, settings, run, ledger):
            break
        released = _apply(outcome, server_round, state, settings, ledger)
        line = _round_line(outcome, server_round, state, settings, splits, ledger, released, started)
        _record(line, server_round, state, settings, run, on_round)
        Checkpoint.capture(
            server_round, state.weights, state.lines, ledger.to_dict(state.hospitals), federation.strategy,
            run_settings_dict(settings), state.average, state.selected,
        ).save(run.path)
    return _finish(federation, settings, splits, run, ledger, state)


@dataclass
class RoundsState:
    """What the server carries from round to round (a checkpoint holds it)."""

    weights: dict[str, torch.Tensor]
    hospitals: list[int]
    facts: dict[int, dict]  # what each hospital said about itself at discovery
    lines: list[dict] = field(default_factory=list)
    first_round: int = 1
    average: dict[str, torch.Tensor] | None = None  # evaluation.ema
    selected: dict | None = None  # evaluation.select=best_val: the best round so far
    unconfirmed: dict[int, int] = field(default_factory=dict)  # hospital → rounds it failed in since its record was last read
    central_sigma: float | None = None  # privacy=central: σ of every release, calibrated once for the planned rounds

    @property
    def current(self) -> dict[str, torch.Tensor]:
        """The model a round evaluates: the moving average once there is one."""
        return _final(self.weights, self.average)


def _start(federation: Federation, settings: RunSettings, ledger: PrivacyLedger, resume_from: Checkpoint | None,
           val: ImageRecords) -> RoundsState:
    """The starting model (or the checkpoint's state), after discovering the hospitals. A
    resumed run takes its weights and public steps from the checkpoint and its ledger, so the
    starting point (a prior, a standardization pass) is not made again."""
    if resume_from is not None:
        start = dict(weights=resume_from.weights, lines=list(resume_from.lines), first_round=resume_from.round + 1,
                     average=resume_from.ema, selected=resume_from.selected)
        restore_strategy_state(federation.strategy, resume_from.strategy)
        resume_from.restore_rngs()
    else:
        weights, ledger.public = starting_point(settings, val)  # steps that touched no hospital record (ε = 0)
        start = dict(weights=weights)
    facts = federation.describe_hospitals()
    hospitals = _sync_ledger(ledger, settings, facts)
    central_sigma = central_noise_multiplier(settings) if settings.privacy.central else None
    return RoundsState(**start, hospitals=hospitals, facts=facts, central_sigma=central_sigma)


def _account(outcome, server_round: int, state: RoundsState, federation, settings: RunSettings, run: RunDirectory, ledger: PrivacyLedger) -> bool:
    """Take what the hospitals spent into the ledger and apply the failure policy: False when
    no hospital can train within its budget (the run ends); too few replies stop the run."""
    for hospital, reason in outcome.failed.items():
        log.warning("round %d: hospital %s failed: %s", server_round, hospital, reason)
    for hospital in outcome.exhausted:
        log.warning("round %d: hospital %s declined: its privacy budget would be exceeded", server_round, hospital)
    if settings.privacy.local:  # spent by every hospital that trained, released or not
        _sync_ledger(ledger, settings, {**outcome.trained, **outcome.exhausted})
        for hospital in [*outcome.trained, *outcome.exhausted]:  # their replies carried their whole record
            state.unconfirmed.pop(hospital, None)
        for hospital in outcome.failed:
            state.unconfirmed[hospital] = state.unconfirmed.get(hospital, 0) + 1
    if outcome.exhausted and not outcome.trained and not outcome.failed:
        if not state.lines:
            raise FedprivError(
                f"privacy.budget_epsilon={settings.privacy.budget} is below what one round costs; "
                "raise it, or lower local_epochs"
            )
        log.warning("round %d: no hospital can train within its privacy budget; the run ends", server_round)
        return False
    if len(outcome.trained) < settings.faults.min_replies:
        reasons = "; ".join(f"hospital {h}: {r}" for h, r in outcome.failed.items()) or "no replies"
        # spent before failing: only hospitals that failed can hold sessions the ledger lacks
        _sync_ledger(ledger, settings, federation.describe_hospitals(_failed_hospitals(state.lines) | set(outcome.failed)))
        ledger.save(run.path / "ledger.json", state.hospitals, settings.privacy.local, settings.privacy.central)
        raise FedprivError(
            f"round {server_round}: {len(outcome.trained)} hospital(s) trained, fewer than "
            f"faults.min_replies={settings.faults.min_replies} ({reasons})"
        )
    return True


def _apply(outcome, server_round: int, state: RoundsState, settings: RunSettings, ledger: PrivacyLedger) -> bool:
    """The aggregate becomes the global model (and enters the moving average; under
    client-level DP the release is recorded); False when the round was withheld."""
    if outcome.weights is None:
        log.warning("round %d: not every sampled hospital replied; under client-level DP (privacy=central) the round is not released", server_round)
        return False
    state.weights = outcome.weights
    if settings.evaluation.ema is not None:
        state.average = update_average(state.average, state.weights, settings.evaluation.ema)
    if settings.privacy.central:
        ledger.record_release(server_round, state.central_sigma, 1.0)
    return True


def _round_line(outcome, server_round: int, state: RoundsState, settings: RunSettings, splits: SplitData,
                ledger: PrivacyLedger, released: bool, started: float) -> dict:
    """The round's metrics line: the current model evaluated (validation only under
    evaluation.select=best_val), ε so far, who trained, failed or declined, and times."""
    train_seconds = time.perf_counter() - started
    epsilons = _epsilons(ledger, settings, state.hospitals, state.unconfirmed, state.facts) if settings.privacy.local else None
    return RoundLine(**{
        "round": server_round,
        **evaluate(settings, state.current, splits, test=settings.evaluation.select != "best_val"),
        "train_loss": _weighted_mean(outcome.trained, "train_loss"),
        "epsilon": epsilons,
        "max_epsilon": max(epsilons.values()) if epsilons else None,
        "epsilon_unconfirmed": sorted(state.unconfirmed),
        "client_epsilon": ledger.client_level_epsilon() if settings.privacy.central else None,
        "released": released,
        "hospitals_trained": sorted(outcome.trained),
        "hospitals_failed": {str(h): r for h, r in outcome.failed.items()},
        "hospitals_exhausted": sorted(outcome.exhausted),
        "client_seconds": {str(h): m["seconds"] for h, m in outcome.trained.items()},
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
    }).to_dict()


def _record(line: dict, server_round: int, state: RoundsState, settings: RunSettings, run: RunDirectory, on_round) -> None:
    """Write and show the line; under evaluation.select=best_val keep the round if it is the best so far."""
    run.append_metrics(line)
    log.info(describe_round(line, settings.rounds))
    on_round(line)
    state.lines.append(line)
    if settings.evaluation.select == "best_val" and _better(line["val_auroc"], state.selected):
        state.selected = {"round": server_round, "val_auroc": line["val_auroc"], "weights": {k: v.clone() for k, v in state.current.items()}}


def _finish(federation, settings: RunSettings, splits: SplitData, run: RunDirectory, ledger: PrivacyLedger,
            state: RoundsState) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """The final model, its one evaluation on the test split, and the ledger, complete."""
    # Hospitals that trained and then failed have spent privacy the server never heard of;
    # every other one reported its whole record with its reply (resumes: at discovery).
    _sync_ledger(ledger, settings, federation.describe_hospitals(_failed_hospitals(state.lines)))
    lines, selected = state.lines, state.selected
    if selected is not None:  # the test split's one evaluation, for the chosen model
        final, evaluation = selected["weights"], {"round": selected["round"], **evaluate(settings, selected["weights"], splits)}
    else:  # select=last, or no round had a defined validation AUROC
        final = state.current
        select_on_val = settings.evaluation.select == "best_val"
        evaluation = lines[-1] if not select_on_val else {"round": lines[-1]["round"], **evaluate(settings, final, splits)}
    run.save_weights(final)
    ledger.save(run.path / "ledger.json", state.hospitals, settings.privacy.local, settings.privacy.central)
    return lines, final, evaluation


def _better(val_auroc: float, selected: dict | None) -> bool:
    """Whether this round's validation AUROC beats the selected round's (ties keep the earlier)."""
    return not math.isnan(val_auroc) and (selected is None or val_auroc > selected["val_auroc"])


def _final(weights: dict[str, torch.Tensor], average: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The model the run evaluates and saves: the moving average once there is one."""
    return average if average is not None else weights


def _use_synthetic(federation, settings, run, ledger, weights, first_round: int, val: ImageRecords) -> dict[str, torch.Tensor]:
    """Hospitals train their GANs and the server pools the images (accounted in the ledger);
    `augment` sends the pool with every round, `pretrain` trains the global model on it."""
    prior = gan_prior(settings)  # computed here once; the hospitals read it from the cache
    if prior is not None and prior[1] not in ledger.public:
        ledger.public.append(prior[1])
    shared = share_synthetic(federation, settings, run.path)
    _sync_ledger(ledger, settings, shared.reports)
    pool = _trusted_pool(settings, run, shared.pool, val)
    if pool is None:
        return weights
    if settings.synthetic.name == "augment":
        federation.share(pool.to_arrays())
    elif first_round == 1:
        started = time.perf_counter()
        weights = train_on_synthetic(settings, weights, pool)
        run.save_weights(weights, PRETRAINED_FILE)  # RUN/synthetic/pretrained.pt
        log.info("pretrained on %d synthetic images in %.1f s", len(pool), time.perf_counter() - started)
    return weights


def _trusted_pool(settings: RunSettings, run: RunDirectory, pool: SyntheticPool, val: ImageRecords) -> SyntheticPool | None:
    """Score the pool's label fidelity (RUN/synthetic/fidelity.json), flag pools whose labels
    are at chance or swapped, and keep the hospitals that reach synthetic.min_fidelity; None
    when none does (the run goes on without synthetic images; what the GANs spent stays spent)."""
    starting = global_model(settings, initial_weights(settings, val))
    scores = pool_fidelity(pool, val, starting, settings.training.eval_batch_size)
    for name, score in scores.items():
        if score.verdict != "ok":
            who = "the pooled images" if name == "pooled" else f"hospital {name}'s synthetic images"
            what = {"swapped": "swapped", "chance": "to carry no class (at chance)", "one class": "to be of one class only"}
            log.warning("%s: labels look %s (train-on-synthetic validation AUROC %.3f)", who, what[score.verdict], score.val_auroc)
    trusted = trusted_hospitals(scores, settings.synthetic.min_fidelity)
    write_json(
        Path(run.path) / SYNTHETIC_DIR / FIDELITY_FILE,
        {"scores": {k: v.to_dict() for k, v in scores.items()}, "min_fidelity": settings.synthetic.min_fidelity, "used_hospitals": trusted},
    )
    if not trusted:
        log.warning(
            "synthetic.min_fidelity=%s: no hospital's synthetic images reach it; the run goes on without synthetic images",
            settings.synthetic.min_fidelity,
        )
        return None
    return pool if len(trusted) == len(scores) - 1 else pool.of_hospitals(trusted)


def _sync_ledger(ledger: PrivacyLedger, settings: RunSettings, reports: dict[int, dict]) -> list[int]:
    """Take each hospital's own record of its DP-SGD sessions into the ledger; return the
    hospitals that reported."""
    if settings.privacy.local:
        for hospital, report in sorted(reports.items()):
            ledger.sync_hospital(hospital, history_from_metrics(report))
            if "epsilon" in report and not math.isclose(ledger.epsilon(hospital), report["epsilon"], rel_tol=1e-6, abs_tol=1e-9):
                raise FedprivError(
                    f"hospital {hospital} reports ε={report['epsilon']:.6f} but the ledger computes "
                    f"{ledger.epsilon(hospital):.6f}; do not trust this run"
                )
    return sorted(reports)


def _epsilons(ledger: PrivacyLedger, settings: RunSettings, hospitals: list[int], unconfirmed: dict[int, int], facts: dict) -> dict[str, float]:
    """Each hospital's ε so far. A hospital that failed since its record was last read may
    have trained before failing: each such round counts as the session its plan has it run
    (within its budget), so that no line shows less than was spent; the line lists these
    hospitals under `epsilon_unconfirmed` until their record is read."""
    epsilons = {str(h): ledger.epsilon(h) for h in hospitals}
    for hospital, rounds in unconfirmed.items():
        history = ledger.history(hospital)
        session = classifier_mechanism(settings, facts[hospital]["num_examples"]).entry
        for _ in range(rounds):
            if fits_budget(history, session, settings.privacy):
                history.append(session)
        epsilons[str(hospital)] = epsilon_spent(history, settings.privacy.delta)
    return epsilons


def _failed_hospitals(lines: list[dict]) -> set[int]:
    """Hospitals that failed (error or no reply) in any round so far."""
    return {int(h) for line in lines for h in line["hospitals_failed"]}


def _weighted_mean(trained: dict[int, dict], key: str) -> float:
    reports = [trained[h] for h in sorted(trained)]  # a fixed order: float sums do not commute
    total = sum(m[NUM_EXAMPLES] for m in reports)
    return sum(m[key] * m[NUM_EXAMPLES] for m in reports) / total
