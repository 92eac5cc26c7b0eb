"""Utility metrics with malignant as the positive class (scikit-learn underneath)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC, accuracy, sensitivity and specificity; NaN where undefined.

    AUROC/AUPRC need both classes; sensitivity needs a malignant case, specificity a benign one.
    """
    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else math.nan,
        "auprc": float(average_precision_score(labels, scores)) if both else math.nan,
        "accuracy": float((tp + tn) / len(labels)) if len(labels) else math.nan,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
    }
