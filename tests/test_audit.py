"""Membership-inference audit: the ε bound by hand, the audit on synthetic scores, and end to end
on a real model — it separates members of an overfit non-private model, and finds nothing when
membership is assigned at random."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import fedpriv.models  # noqa: F401  (registers fedpriv_cnn_small with timm)
from fedpriv.audit import _clopper_pearson, audit_membership, epsilon_lower_bound, membership_scores
from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.data.records import ImageRecords
from fedpriv.errors import FedprivError
from fedpriv.training import RecordDataset, train_epochs

DELTA = 1e-5


# --- epsilon_lower_bound -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tpr, fpr, delta, expected",
    [
        (0.5, 0.05, 0.0, math.log(10)),  # first term: 0.5/0.05
        (0.95, 0.5, 0.0, math.log(10)),  # the mirror test: TNR/FNR = 0.5/0.05
        (0.5, 0.05, 0.1, math.log(8)),  # δ comes off the numerator: 0.4/0.05
        (0.9, 0.1, 0.0, math.log(9)),  # both terms equal: 0.9/0.1 = 0.9/0.1
        (0.05, 0.5, 0.0, 0.0),  # worse than guessing proves nothing
        (0.0, 0.0, 0.0, 0.0),  # never says "member": no evidence
        (1.0, 1.0, 0.0, 0.0),  # always says "member": no evidence
        (0.3, 0.0, 0.0, math.inf),  # a true positive with no false positive: no finite ε
        (1.0, 0.2, 0.0, math.inf),  # no false negative with a true negative: no finite ε
        (0.3, 0.0, 0.3, math.log(0.7 / 0.7)),  # δ explains TPR; mirror term ln(0.7/0.7) = 0
    ],
)
def test_epsilon_lower_bound_matches_hand_computed_cases(tpr, fpr, delta, expected):
    assert epsilon_lower_bound(tpr, fpr, delta) == pytest.approx(expected)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_epsilon_lower_bound_is_zero_when_the_attack_is_a_coin(rate):
    assert epsilon_lower_bound(rate, rate, 0.0) == 0.0
    assert epsilon_lower_bound(rate, rate, DELTA) == 0.0


@pytest.mark.parametrize("tpr, fpr, delta", [(1.2, 0.1, 0.0), (0.5, -0.1, 0.0), (math.nan, 0.1, 0.0), (0.5, 0.1, 1.0)])
def test_epsilon_lower_bound_rejects_rates_and_deltas_out_of_range(tpr, fpr, delta):
    with pytest.raises(FedprivError):
        epsilon_lower_bound(tpr, fpr, delta)


def test_clopper_pearson_matches_closed_forms_at_the_edges():
    # k = 0 of n: upper bound 1 − α^(1/n); k = n: lower bound α^(1/n).
    lower, upper = _clopper_pearson(np.array([0, 10]), 10, 0.95)
    assert lower[0] == 0.0 and upper[1] == 1.0
    assert upper[0] == pytest.approx(1 - 0.05 ** (1 / 10))
    assert lower[1] == pytest.approx(0.05 ** (1 / 10))


# --- audit_membership on synthetic scores --------------------------------------------------


def test_audit_reports_auroc_and_tpr_at_low_fpr_as_computed_by_hand():
    members, nonmembers = np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.2, 0.1, 0.0])
    result = audit_membership(members, nonmembers, delta=0.0, low_fprs=(0.1, 0.25, 0.5))
    assert result["attack_auroc"] == pytest.approx(11 / 12)  # only 0.3 < 0.7 is ordered wrongly
    assert result["tpr_at_fpr"] == pytest.approx({"0.1": 2 / 3, "0.25": 1.0, "0.5": 1.0})
    assert (result["n_members"], result["n_nonmembers"]) == (3, 4)
    # Threshold 0.8 has TPR 2/3 with no false positive: the empirical rates allow no finite ε.
    assert result["epsilon_lower_bound"] == math.inf


def test_audit_values_are_plain_json_numbers():
    rng = np.random.default_rng(0)
    result = audit_membership(rng.normal(1, 1, 200), rng.normal(0, 1, 200), delta=DELTA)
    assert set(result) == {
        "attack_auroc", "tpr_at_fpr", "n_members", "n_nonmembers", "epsilon_lower_bound", "epsilon_lower_bound_ci",
    }
    assert all(type(v) in (float, int) for k, v in result.items() if k != "tpr_at_fpr")
    assert all(type(v) is float for v in result["tpr_at_fpr"].values())
    assert list(result["tpr_at_fpr"]) == ["0.001", "0.01", "0.1"]
    assert json.loads(json.dumps(result))["n_members"] == 200


def test_confidence_bound_on_perfectly_separated_sets_is_the_clopper_pearson_value():
    # Any split leaves 100 members at 1 and 100 non-members at 0; the chosen threshold separates
    # them, so TPR ≥ a and FPR ≤ 1 − a with a = α^(1/100), α = 0.05/2 (Bonferroni over 2 rates).
    result = audit_membership(np.ones(200), np.zeros(200), delta=0.0, confidence=0.95, seed=3)
    a = 0.025 ** (1 / 100)
    assert result["epsilon_lower_bound_ci"] == pytest.approx(math.log(a / (1 - a)))
    assert result["attack_auroc"] == 1.0 and result["epsilon_lower_bound"] == math.inf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_distributions_show_no_leakage(seed):
    rng = np.random.default_rng(seed)
    result = audit_membership(rng.normal(0, 1, 3000), rng.normal(0, 1, 3000), delta=DELTA, seed=seed)
    assert abs(result["attack_auroc"] - 0.5) < 0.04
    assert 0.0 <= result["epsilon_lower_bound_ci"] < 0.3
    assert result["tpr_at_fpr"]["0.01"] < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separated_distributions_give_high_auroc_and_a_positive_confidence_bound(seed):
    rng = np.random.default_rng(seed)
    result = audit_membership(rng.normal(3, 1, 3000), rng.normal(0, 1, 3000), delta=DELTA, seed=seed)
    assert result["attack_auroc"] > 0.95
    assert result["epsilon_lower_bound_ci"] > 1.0
    assert result["epsilon_lower_bound_ci"] <= result["epsilon_lower_bound"]
    assert result["tpr_at_fpr"]["0.1"] > 0.8


def test_confidence_bound_is_below_the_point_estimate_when_that_is_finite():
    # A non-member at the very top and a member at the very bottom keep the empirical FPR
    # above 0 and the TPR below 1 at every threshold that proves anything.
    rng = np.random.default_rng(5)
    members, nonmembers = np.append(rng.normal(1.5, 1, 2000), -100.0), np.append(rng.normal(0, 1, 2000), 100.0)
    result = audit_membership(members, nonmembers, delta=DELTA)
    assert math.isfinite(result["epsilon_lower_bound"])
    assert 0.0 < result["epsilon_lower_bound_ci"] <= result["epsilon_lower_bound"]


def test_confidence_bound_is_deterministic_given_the_seed():
    rng = np.random.default_rng(7)
    members, nonmembers = rng.normal(1, 1, 500), rng.normal(0, 1, 500)
    first = audit_membership(members, nonmembers, delta=DELTA, seed=11)
    assert audit_membership(members, nonmembers, delta=DELTA, seed=11) == first


def test_too_few_scores_to_split_give_a_zero_confidence_bound():
    result = audit_membership(np.array([5.0]), np.array([0.0, 1.0, 2.0]), delta=DELTA)
    assert result["epsilon_lower_bound_ci"] == 0.0 and result["attack_auroc"] == 1.0


@pytest.mark.parametrize(
    "members, nonmembers, kwargs, message",
    [
        ([], [0.1, 0.2], {}, "member"),
        ([0.1, 0.2], [], {}, "nonmember"),
        ([0.1, math.nan], [0.1, 0.2], {}, "NaN"),
        ([0.1, 0.2], [math.nan, 0.2], {}, "NaN"),
        ([0.1, 0.2], [-math.inf, 0.2], {}, "infinite"),
        ([0.1, 0.2], [0.1, 0.2], {"delta": 1.5}, "delta"),
        ([0.1, 0.2], [0.1, 0.2], {"confidence": 1.0}, "confidence"),
        ([0.1, 0.2], [0.1, 0.2], {"low_fprs": (0.0,)}, "low_fprs"),
    ],
)
def test_audit_rejects_bad_input_with_a_clear_message(members, nonmembers, kwargs, message):
    with pytest.raises(FedprivError, match=message):
        audit_membership(np.array(members), np.array(nonmembers), **{"delta": DELTA, **kwargs})


# --- membership_scores ---------------------------------------------------------------------


def _records(n: int, labels: np.ndarray) -> ImageRecords:
    images = np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)
    return ImageRecords(images=images, labels=labels, patient_ids=np.array([f"P{i}" for i in range(n)]))


def _constant_model(logit: float) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    nn.init.zeros_(model[1].weight)
    nn.init.constant_(model[1].bias, logit)
    return model


def test_membership_scores_are_negative_per_example_cross_entropy():
    records = _records(4, np.array([1, 0, 1, 0]))
    p = 1 / (1 + math.exp(-0.7))
    scores = membership_scores(_constant_model(0.7), records, batch_size=3)
    assert scores == pytest.approx([math.log(p), math.log(1 - p)] * 2, rel=1e-5)


def test_membership_scores_stay_finite_when_the_model_saturates():
    scores = membership_scores(_constant_model(100.0), _records(2, np.array([1, 0])), batch_size=2)
    assert np.isfinite(scores).all()
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[1] == pytest.approx(math.log(1e-7), rel=1e-3)


def test_membership_scores_reject_labels_outside_zero_and_one():
    with pytest.raises(FedprivError, match="labels"):
        membership_scores(_constant_model(0.0), _records(2, np.array([0, 2])), batch_size=2)


# --- end to end on a real model ------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_audit():
    """Scores of a non-private CNN before and after memorising 64 phantom patches whose labels
    are random (memorisation is the only way to fit them), for members and 256 held-out ones."""
    spec = PhantomSpec(
        num_patients=320, images_per_patient=1, image_size=32, num_sites=2,
        malignant_fraction=0.5, class_separation=1.0, noise_level=1.0,
    )
    data = generate_phantom_mammo(spec, seed=2)
    data.labels = np.random.default_rng(2).integers(0, 2, len(data))
    members, nonmembers = data.subset(np.arange(64)), data.subset(np.arange(64, 320))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only adds contention
    try:
        torch.manual_seed(2)
        model = timm.create_model("fedpriv_cnn_small", num_classes=1, in_chans=1, widths=(8, 16))
        untrained = (membership_scores(model, members, 128), membership_scores(model, nonmembers, 128))
        loader = DataLoader(RecordDataset(members, augment=False), batch_size=64, shuffle=True)
        loss = train_epochs(model, torch.optim.Adam(model.parameters(), lr=3e-3), loader, epochs=150, sum_loss=False)
        trained = (membership_scores(model, members, 128), membership_scores(model, nonmembers, 128))
    finally:
        torch.set_num_threads(threads)
    return {"untrained": untrained, "trained": trained, "train_loss": loss}


def test_audit_separates_members_of_an_overfit_non_private_model(overfit_audit):
    members, nonmembers = overfit_audit["trained"]
    result = audit_membership(members, nonmembers, delta=DELTA)
    assert result["attack_auroc"] > 0.8
    assert result["epsilon_lower_bound_ci"] > 0.5
    assert result["tpr_at_fpr"]["0.1"] > 0.5


def test_audit_finds_no_leakage_between_random_halves_of_held_out_records(overfit_audit):
    _, nonmembers = overfit_audit["trained"]
    order = np.random.default_rng(0).permutation(len(nonmembers))
    half = len(order) // 2
    result = audit_membership(nonmembers[order[:half]], nonmembers[order[half:]], delta=DELTA)
    assert abs(result["attack_auroc"] - 0.5) < 0.15
    assert result["epsilon_lower_bound_ci"] < 0.3


def test_audit_finds_no_leakage_before_the_model_has_seen_the_members(overfit_audit):
    members, nonmembers = overfit_audit["untrained"]
    result = audit_membership(members, nonmembers, delta=DELTA)
    assert abs(result["attack_auroc"] - 0.5) < 0.15
    assert result["epsilon_lower_bound_ci"] < 0.3
