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


from fedpriv.metrics import auroc, bootstrap_interval, fairness_report, subgroup_labels  # noqa: E402


@pytest.mark.parametrize("seed", range(5))
def test_rank_auroc_equals_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert math.isnan(auroc(np.zeros(5), scores[:5]))


def test_subgroup_labels_bin_numbers_and_keep_categories():
    assert list(subgroup_labels(np.array([40, 50, 64, 65, 90]), [50, 65])) == ["<50", "50-65", "50-65", ">=65", ">=65"]
    assert list(subgroup_labels(np.array(["a", "b"]), [])) == ["a", "b"]


def test_fairness_report_hand_computed():
    #            group A: 4 cases         group B: 4 cases
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.3, 0.2, 0.1, 0.6])
    groups = np.array(["A"] * 4 + ["B"] * 4)
    report = fairness_report(labels, scores, groups)
    a, b = report["groups"]["A"], report["groups"]["B"]
    # A predicts 1 1 1 0 -> positive rate 3/4, acc 3/4, tpr 1, fpr 1/2
    # B predicts 0 0 0 1 -> positive rate 1/4, acc 2/4, tpr 0, fpr 1/3
    assert a["positive_rate"] == pytest.approx(0.75) and b["positive_rate"] == pytest.approx(0.25)
    assert report["spd"] == pytest.approx(0.5)
    assert a["accuracy_spd"] == pytest.approx(0.75 - 0.5) and b["accuracy_spd"] == pytest.approx(0.5 - 0.75)
    assert report["equalized_odds_difference"] == pytest.approx(1.0)  # TPR 1 vs 0
    assert a["auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.1]))
    assert report["worst_group_auroc"] == pytest.approx(min(a["auroc"], b["auroc"]))
    assert a["n"] == 4 and a["n_malignant"] == 2


def test_group_without_malignant_cases_is_undefined_not_zero_and_left_out_of_gaps():
    labels = np.array([1, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.8, 0.3, 0.7, 0.1])
    groups = np.array(["A", "A", "A", "A", "B", "B"])
    report = fairness_report(labels, scores, groups)
    b = report["groups"]["B"]
    assert math.isnan(b["auroc"]) and math.isnan(b["sensitivity"])
    assert math.isnan(report["auroc_gap"])  # one defined AUROC is not a gap
    assert report["worst_group_auroc"] == pytest.approx(1.0)


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = labels * 0.3 + rng.random(300)
    low, high = bootstrap_interval(labels, scores, roc_auc_score, rounds=200, seed=1)
    assert low < roc_auc_score(labels, scores) < high and high - low < 0.2
