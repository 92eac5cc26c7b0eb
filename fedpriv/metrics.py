"""Utility metrics with malignant as the positive class (scikit-learn underneath)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, confusion_matrix, roc_curve

#: How `evaluation.threshold` may be written (malignant when score ≥ threshold).
THRESHOLD_RULES = "youden, sensitivity@X, specificity@X (X in (0, 1]) or a fixed number in (0, 1)"


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC by the Mann–Whitney rank statistic (ties count half), NaN with one class.

    Equal to scikit-learn's roc_auc_score, and fast enough to bootstrap.
    """
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC, accuracy, sensitivity and specificity; NaN where undefined.

    AUROC/AUPRC need both classes; sensitivity needs a malignant case, specificity a benign one.
    """
    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "auroc": auroc(labels, scores),
        "auprc": float(average_precision_score(labels, scores)) if both else math.nan,
        "accuracy": float((tp + tn) / len(labels)) if len(labels) else math.nan,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
    }


def parse_threshold(rule: str | float) -> tuple[str, float | None]:
    """`youden` → ("youden", None); `sensitivity@0.9` → ("sensitivity", 0.9); likewise
    `specificity@X`; a number t in (0, 1) → ("fixed", t). ValueError for anything else."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if 0 < rule < 1:
            return "fixed", float(rule)
        raise ValueError(f"a fixed threshold must be in (0, 1), not {rule}")
    text = str(rule).strip().lower()
    if text == "youden":
        return "youden", None
    kind, _, target = text.partition("@")
    if kind in ("sensitivity", "specificity"):
        try:
            value = float(target)
        except ValueError:
            raise ValueError(f"{rule!r} needs a target, e.g. {kind}@0.9") from None
        if 0 < value <= 1:
            return kind, value
        raise ValueError(f"the target of {rule!r} must be in (0, 1]")
    try:
        return parse_threshold(float(text))
    except ValueError:
        raise ValueError(f"{rule!r} is not a threshold rule") from None


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str | float) -> float:
    """The decision threshold `rule` picks on these (validation) scores; NaN when the rule needs
    both classes and the labels have one.

    `youden`: the threshold maximising sensitivity + specificity − 1 (Youden's J; the highest
    of equal ones); `sensitivity@X`: the highest threshold whose sensitivity is at least X (the
    best specificity at that sensitivity); `specificity@X`: the lowest threshold whose
    specificity is at least X; a number: that number.
    """
    kind, target = parse_threshold(rule)
    if kind == "fixed":
        return target
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return math.nan
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first point is "nothing positive" (∞)
    if kind == "youden":
        index = int(np.argmax(tpr - fpr))
    elif kind == "sensitivity":
        index = int(np.argmax(tpr >= target - 1e-12))
    else:
        meets = np.flatnonzero(1 - fpr >= target - 1e-12)
        index = int(meets[-1]) if len(meets) else 0
    return float(thresholds[index])


def subgroup_labels(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Group names for a metadata column: categories as they are, numbers binned by edges
    (e.g. age with edges [50, 65] → "<50", "50-65", ">=65")."""
    if not edges:
        return np.asarray(values).astype(str)
    names = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
    return np.array(names)[np.searchsorted(np.asarray(edges, dtype=float), np.asarray(values, dtype=float), side="right")]


def group_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """binary_metrics plus positive rate and counts, for one subgroup."""
    labels = np.asarray(labels).astype(int)
    metrics = binary_metrics(labels, scores, threshold)
    metrics.update(
        positive_rate=float(np.mean(np.asarray(scores) >= threshold)) if len(labels) else math.nan,
        n=int(len(labels)),
        n_malignant=int(labels.sum()),
    )
    return metrics


def fairness_report(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float = 0.5
) -> dict:
    """Per-group metrics and the gaps between groups for one attribute.

    - `spd`: statistical parity difference, max − min positive rate over groups;
    - per group `accuracy_spd`: its accuracy minus the n-weighted accuracy of all other
      groups (Tayebi Arasteh et al.; negative = the group is served worse);
    - `equalized_odds_difference`: the larger of the max−min gaps in sensitivity (TPR) and
      in 1 − specificity (FPR);
    - `worst_group_auroc` and `auroc_gap` (max − min) over groups where AUROC is defined.
    Undefined values (a group without malignant cases has no AUROC or sensitivity) are NaN,
    never 0 or 1, and are left out of the gaps.
    """
    labels, scores, groups = np.asarray(labels).astype(int), np.asarray(scores), np.asarray(groups)
    names = sorted(set(groups.tolist()))
    per_group = {g: group_metrics(labels[groups == g], scores[groups == g], threshold) for g in names}
    correct = (scores >= threshold).astype(int) == labels
    for g in names:
        rest = groups != g
        per_group[g]["accuracy_spd"] = (
            float(correct[groups == g].mean() - correct[rest].mean()) if rest.any() else math.nan
        )
    return {
        "groups": per_group,
        "spd": _gap([m["positive_rate"] for m in per_group.values()]),
        "equalized_odds_difference": _nanmax(
            _gap([m["sensitivity"] for m in per_group.values()]),
            _gap([1 - m["specificity"] for m in per_group.values()]),
        ),
        "worst_group_auroc": _nanmin([m["auroc"] for m in per_group.values()]),
        "auroc_gap": _gap([m["auroc"] for m in per_group.values()]),
    }


def bootstrap_interval(
    labels: np.ndarray, scores: np.ndarray, metric, rounds: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of metric(labels, scores); NaN where resamples lack a class."""
    rng = np.random.default_rng(seed)
    labels, scores = np.asarray(labels), np.asarray(scores)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(labels), len(labels))
        value = metric(labels[pick], scores[pick])
        if math.isfinite(value):
            values.append(value)
    if len(values) < rounds // 2:
        return math.nan, math.nan
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _gap(values) -> float:
    finite = _finite(values)
    return float(max(finite) - min(finite)) if len(finite) >= 2 else math.nan


def _nanmin(values) -> float:
    finite = _finite(values)
    return float(min(finite)) if finite else math.nan


def _nanmax(*values) -> float:
    finite = _finite(values)
    return float(max(finite)) if finite else math.nan
