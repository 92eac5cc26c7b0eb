import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedpriv.metrics import binary_metrics


def test_hand_computed_case():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1])
    m = binary_metrics(labels, scores)
    # predictions at 0.5: 1 1 0 1 0 0 0 -> tp=2 fn=1 fp=1 tn=3
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 7)
    # pairs (pos, neg) ranked correctly: 0.9 beats 4, 0.6 beats 3, 0.4 beats 3 -> 10/12
    assert m["auroc"] == pytest.approx(10 / 12)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))


def test_malignant_is_positive():
    labels = np.array([1, 0, 1, 0])
    assert binary_metrics(labels, np.array([0.9, 0.1, 0.8, 0.2]))["auroc"] == 1.0
    assert binary_metrics(labels, np.array([0.1, 0.9, 0.2, 0.8]))["auroc"] == 0.0


def test_single_class_gives_undefined_not_zero():
    m = binary_metrics(np.array([0, 0, 0]), np.array([0.1, 0.7, 0.2]))
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(2 / 3)
