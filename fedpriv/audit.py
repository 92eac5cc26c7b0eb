"""Empirical privacy audit by membership inference: how much ε a simple attack proves.

A loss-threshold attack scores every record (members = trained on, non-members = held out);
each threshold is a hypothesis test whose TPR and FPR imply a lower bound on ε for a given δ
(an (ε, δ)-DP model forces TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ; Kairouz et al. 2015,
Jagielski et al. 2020). The point estimate uses empirical rates; the reported confidence bound
uses Clopper–Pearson intervals on a threshold chosen from held-apart data, so that it is a
lower bound one can quote. The audit lower-bounds ε: a small value never proves privacy.

Caveat: treating the members as independent trials of the DP guessing game is exact only
when membership was assigned at random before training (Steinke et al. 2023, "privacy
auditing with one training run"); for a fixed train/test split it is the usual heuristic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from fedpriv.data.records import ImageRecords
from fedpriv.errors import FedprivError
from fedpriv.training import predict

log = logging.getLogger(__name__)

#: Probabilities are clipped to [floor, 1 − floor] before taking logs: float32 sigmoids
#: saturate to exactly 0 or 1, and one infinite loss would make scores incomparable.
PROBABILITY_FLOOR = 1e-7


def membership_scores(model: torch.nn.Module, records: ImageRecords, batch_size: int) -> np.ndarray:
    """Per-record attack score: the negative binary cross-entropy of the model (higher = member).

    The loss-threshold attack of Yeom et al. 2018: a model fits its training records better.
    """
    labels = np.asarray(records.labels)
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise FedprivError(f"membership_scores needs labels in {{0, 1}}, got values {np.unique(labels)[:5]}")
    probabilities = np.asarray(predict(model, records, batch_size), dtype=np.float64)
    if not np.isfinite(probabilities).all():
        raise FedprivError("the audited model predicts NaN probabilities; it has diverged, audit a finite model")
    p = np.clip(probabilities, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return np.where(labels == 1, np.log(p), np.log1p(-p))


def epsilon_lower_bound(tpr: float, fpr: float, delta: float) -> float:
    """The ε that one membership test with these true/false positive rates proves at this δ.

    max(0, ln((TPR − δ)/FPR), ln((1 − δ − FPR)/(1 − TPR))); a term whose numerator is not
    positive proves nothing, and +inf only when a zero denominator meets a positive numerator
    (e.g. FPR = 0 with TPR > δ: no finite ε allows it).
    """
    for name, rate in (("tpr", tpr), ("fpr", fpr)):
        if not 0.0 <= rate <= 1.0:  # also rejects NaN
            raise FedprivError(f"{name} must be a rate in [0, 1], got {rate}")
    _check_delta(delta)
    return float(_epsilon_bounds(np.array([tpr], dtype=float), np.array([fpr], dtype=float), delta)[0])


def audit_membership(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    low_fprs: Sequence[float] = (0.001, 0.01, 0.1),
    seed: int = 0,
) -> dict:
    """Attack AUROC, TPR at low FPRs and the ε lower bounds proved by a score-threshold attack.

    Members are the positive class; every value is a plain float or int (JSON-serialisable).

    - `epsilon_lower_bound`: max over all thresholds of the bound from the *empirical* rates.
      Optimistic (it picks the best threshold on the data it scores, and ignores sampling
      error) and +inf whenever one threshold separates the sets with no false positive
      (`RunOutputs` writes that as null); report it as a descriptive number only.
    - `epsilon_lower_bound_ci`: a one-sided lower bound holding with probability ≥ `confidence`.
      Sample splitting: both sets are split into random halves (`seed`); the threshold is
      chosen on the first half (the one maximising the same confidence bound there), and the
      bound is evaluated once, at that fixed threshold, on the second half, using a
      Clopper–Pearson lower bound on TPR and upper bound on FPR, each at level
      1 − (1 − confidence)/2 (Bonferroni over the two rates). Choosing and evaluating on the
      same data would be optimistic; splitting costs half the data but no correction for
      the number of thresholds tried. The bound is finite and never below 0; with fewer than
      two members or non-members there is nothing to split and it is 0.
    """
    members = _checked_scores(member_scores, "member")
    nonmembers = _checked_scores(nonmember_scores, "nonmember")
    _check_delta(delta)
    if not 0.0 < confidence < 1.0:
        raise FedprivError(f"confidence must be in (0, 1), got {confidence}")
    targets = [float(f) for f in low_fprs]
    if any(not 0.0 < f <= 1.0 for f in targets):
        raise FedprivError(f"low_fprs must be false positive rates in (0, 1], got {list(low_fprs)}")

    labels = np.concatenate([np.ones(len(members), dtype=int), np.zeros(len(nonmembers), dtype=int)])
    scores = np.concatenate([members, nonmembers])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "attack_auroc": float(roc_auc_score(labels, scores)),
        "tpr_at_fpr": {f"{f:g}": float(tpr[fpr <= f].max()) for f in targets},
        "n_members": int(len(members)),
        "n_nonmembers": int(len(nonmembers)),
        "epsilon_lower_bound": float(_epsilon_bounds(tpr, fpr, delta).max()),
        "epsilon_lower_bound_ci": _split_confidence_bound(members, nonmembers, delta, confidence, seed),
    }


def _clopper_pearson(successes: np.ndarray, trials: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds (lower, upper), each holding with probability ≥ level.

    Exact (conservative) for any sample size, unlike normal approximations near rates 0 and 1.
    """
    k = np.asarray(successes, dtype=float)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, beta.ppf(1.0 - level, np.maximum(k, 1), trials - k + 1), 0.0)
        upper = np.where(k < trials, beta.ppf(level, k + 1, np.maximum(trials - k, 1)), 1.0)
    return lower, upper


def _split_confidence_bound(
    members: np.ndarray, nonmembers: np.ndarray, delta: float, confidence: float, seed: int
) -> float:
    """Choose the threshold on one random half of each set, bound ε on the other half."""
    if len(members) < 2 or len(nonmembers) < 2:
        log.warning(
            "audit: %d members and %d non-members are too few to split; confidence bound set to 0",
            len(members), len(nonmembers),
        )
        return 0.0
    rng = np.random.default_rng(seed)
    m, n = rng.permutation(members), rng.permutation(nonmembers)
    m_choose, m_eval = m[: len(m) // 2], m[len(m) // 2 :]
    n_choose, n_eval = n[: len(n) // 2], n[len(n) // 2 :]
    level = 1.0 - (1.0 - confidence) / 2.0  # Bonferroni: TPR and FPR bounds hold jointly

    candidates = np.unique(np.concatenate([m_choose, n_choose]))
    chosen = _confidence_bounds(m_choose, n_choose, candidates, delta, level)
    best = int(np.argmax(chosen))
    if chosen[best] <= 0.0:
        return 0.0
    threshold = candidates[best : best + 1]
    return float(_confidence_bounds(m_eval, n_eval, threshold, delta, level)[0])


def _confidence_bounds(
    members: np.ndarray, nonmembers: np.ndarray, thresholds: np.ndarray, delta: float, level: float
) -> np.ndarray:
    """ε bound per threshold ("score ≥ t means member") from Clopper–Pearson TPR↓ and FPR↑.

    Both terms of the bound grow with TPR and shrink with FPR, so TPR's lower and FPR's upper
    confidence bound make each term conservative; neither is ever exactly 0 or 1, so it is finite.
    """
    true_pos = len(members) - np.searchsorted(np.sort(members), thresholds, side="left")
    false_pos = len(nonmembers) - np.searchsorted(np.sort(nonmembers), thresholds, side="left")
    tpr_low, _ = _clopper_pearson(true_pos, len(members), level)
    _, fpr_high = _clopper_pearson(false_pos, len(nonmembers), level)
    return _epsilon_bounds(tpr_low, fpr_high, delta)


def _epsilon_bounds(tpr: np.ndarray, fpr: np.ndarray, delta: float) -> np.ndarray:
    """Vectorised epsilon_lower_bound: 0 where neither term has a positive numerator."""
    first = _log_ratio(tpr - delta, fpr)
    second = _log_ratio(1.0 - delta - fpr, 1.0 - tpr)
    return np.maximum(0.0, np.maximum(first, second))


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """ln(numerator/denominator); −inf for a non-positive numerator, +inf for a zero denominator."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(numerator) - np.log(denominator)
    return np.where(numerator > 0, np.where(denominator > 0, ratio, math.inf), -math.inf)


def _checked_scores(scores: np.ndarray, kind: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise FedprivError(f"the audit needs at least one {kind} score, got none")
    bad = ~np.isfinite(values)
    if bad.any():
        raise FedprivError(
            f"{int(bad.sum())} of {values.size} {kind} scores are NaN or infinite; "
            "score a model whose predictions are finite"
        )
    return values


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise FedprivError(f"delta must be in [0, 1), got {delta}")


def audit_federation(
    model: torch.nn.Module,
    train: ImageRecords,
    shards: list[np.ndarray],
    nonmembers: ImageRecords,
    delta: float,
    confidence: float,
    batch_size: int,
    seed: int,
) -> dict:
    """The attack on the final global model: all training records (`pooled`) and each
    hospital's own records (`hospitals`) as members, against the same non-members.

    Reported per set: attack AUROC, TPR at low FPR, and the ε lower bound at `confidence`
    (the optimistic point estimate is left out: it is infinite whenever one threshold
    separates a few records, and would read as a finding).
    """
    member_scores = membership_scores(model, train, batch_size)
    nonmember_scores = membership_scores(model, nonmembers, batch_size)

    def attack(rows: np.ndarray) -> dict:
        result = audit_membership(member_scores[rows], nonmember_scores, delta, confidence, seed=seed)
        result.pop("epsilon_lower_bound")
        return result

    everyone = np.arange(len(train))
    return {
        "attack": "loss threshold",
        "nonmembers": "validation and test splits",
        "confidence": confidence,
        "delta": delta,
        "pooled": attack(everyone),
        "hospitals": {str(h): attack(rows) for h, rows in enumerate(shards)} if len(shards) > 1 else {},
    }
