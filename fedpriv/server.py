"""The server's rounds: train, aggregate, account, evaluate centrally, record."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from fedpriv.data.records import SplitData
from fedpriv.errors import FedprivError
from fedpriv.federation import Federation
from fedpriv.metrics import auroc, binary_metrics, bootstrap_interval, fairness_report, subgroup_labels
from fedpriv.models import build_model
from fedpriv.outputs import RunDirectory
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.settings import RunSettings
from fedpriv.training import predict
from strategies import central_noise_multiplier

log = logging.getLogger(__name__)


def initial_weights(settings: RunSettings) -> dict[str, torch.Tensor]:
    torch.manual_seed(settings.seed)
    return build_model(settings.model, settings.data.image_size).state_dict()


def global_model(settings: RunSettings, weights: dict) -> torch.nn.Module:
    model = build_model(settings.model, settings.data.image_size)
    model.load_state_dict(weights)
    return model


def fairness_attributes(settings: RunSettings, splits: SplitData) -> list[tuple[str, tuple[float, ...]]]:
    """The configured metadata attributes, plus `hospital` (each hospital's own test patients)
    when the test split carries it (federations of more than one hospital)."""
    extra = [("hospital", ())] if "hospital" in splits.test.metadata else []
    return [*settings.data.fairness_attributes, *extra]


def evaluate(settings: RunSettings, weights: dict, splits: SplitData) -> dict:
    """Test metrics (plain names), validation metrics (`val_` prefix) and, per fairness
    attribute, subgroup metrics and gaps on the test split, for the global model."""
    model, batch = global_model(settings, weights), settings.training.eval_batch_size
    scores = predict(model, splits.test, batch)
    val = binary_metrics(splits.val.labels, predict(model, splits.val, batch))
    fairness = {
        name: fairness_report(splits.test.labels, scores, subgroup_labels(splits.test.metadata[name], list(edges)))
        for name, edges in fairness_attributes(settings, splits)
    }
    return {
        **binary_metrics(splits.test.labels, scores),
        **{f"val_{k}": v for k, v in val.items()},
        "fairness": fairness or None,
    }


def final_intervals(settings: RunSettings, weights: dict, splits: SplitData) -> dict:
    """Bootstrap 95% intervals of test AUROC, overall and per subgroup, for the final model."""
    rounds = settings.evaluation.bootstrap
    if rounds == 0:
        return {}
    labels = splits.test.labels
    scores = predict(global_model(settings, weights), splits.test, settings.training.eval_batch_size)
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
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """All rounds; returns the metrics lines (also appended to metrics.jsonl as they come)
    and the final global weights."""
    np.random.seed(settings.seed)  # Flower's central-DP wrappers draw noise from numpy's global RNG
    hospitals = list(federation.describe_hospitals())
    weights = initial_weights(settings)
    central_sigma = central_noise_multiplier(settings) if settings.privacy.central else None
    lines = []
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        outcome = federation.train_round(server_round, weights, {"rounds": settings.rounds})
        for hospital, reason in outcome.failed.items():
            log.warning("round %d: hospital %s failed: %s", server_round, hospital, reason)
        for hospital in outcome.exhausted:
            log.warning("round %d: hospital %s declined: its privacy budget would be exceeded", server_round, hospital)
        if outcome.exhausted and not outcome.trained and not outcome.failed:
            if not lines:
                raise FedprivError(
                    f"privacy.budget_epsilon={settings.privacy.budget} is below what one round costs; "
                    "raise it, or lower local_epochs"
                )
            log.warning("round %d: no hospital can train within its privacy budget; the run ends", server_round)
            break
        if not outcome.trained:
            reasons = "; ".join(f"hospital {h}: {r}" for h, r in outcome.failed.items()) or "no replies"
            raise FedprivError(f"round {server_round}: no hospital trained successfully ({reasons})")
        if settings.privacy.local:  # spent by every hospital that trained, released or not
            _account(ledger, server_round, outcome.trained)
        released = outcome.weights is not None
        if released:
            weights = outcome.weights
            if settings.privacy.central:
                ledger.record_release(server_round, central_sigma, 1.0)
        else:
            log.warning("round %d: not every sampled hospital replied; under central DP the round is not released", server_round)
        train_seconds = time.perf_counter() - started
        epsilons = {str(h): ledger.epsilon(h) for h in hospitals} if settings.privacy.local else None
        line = {
            "round": server_round,
            **evaluate(settings, weights, splits),
            "train_loss": _weighted_mean(outcome.trained, "train_loss"),
            "epsilon": epsilons,
            "max_epsilon": max(epsilons.values()) if epsilons else None,
            "client_epsilon": ledger.client_level_epsilon() if settings.privacy.central else None,
            "released": released,
            "hospitals_trained": sorted(outcome.trained),
            "hospitals_failed": {str(h): r for h, r in outcome.failed.items()},
            "hospitals_exhausted": sorted(outcome.exhausted),
            "client_seconds": {str(h): m["seconds"] for h, m in outcome.trained.items()},
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - started,
        }
        run.append_metrics(line)
        on_round(line)
        lines.append(line)
    run.save_weights(weights)
    ledger.save(run.path / "ledger.json", hospitals)
    return lines, weights


def _account(ledger: PrivacyLedger, server_round: int, trained: dict[int, dict]) -> None:
    """Record each hospital's mechanism; its own accountant must agree with the ledger."""
    for hospital, m in sorted(trained.items()):
        ledger.record(hospital, server_round, m["noise_multiplier"], m["sample_rate"], int(m["steps"]))
        if not math.isclose(ledger.epsilon(hospital), m["epsilon"], rel_tol=1e-6, abs_tol=1e-9):
            raise FedprivError(
                f"hospital {hospital} reports ε={m['epsilon']:.6f} but the ledger computes "
                f"{ledger.epsilon(hospital):.6f}; its privacy state was lost — do not trust this run"
            )


def _weighted_mean(trained: dict[int, dict], key: str) -> float:
    total = sum(m["num-examples"] for m in trained.values())
    return sum(m[key] * m["num-examples"] for m in trained.values()) / total
