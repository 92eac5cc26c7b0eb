"""σ calibration, cumulative ε, and agreement with Google's dp-accounting."""

import multiprocessing

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier

from fedpriv.errors import FedprivError
from fedpriv.privacy import accounting
from fedpriv.privacy.accounting import calibrate_noise_multiplier, epsilon_spent, poisson_plan
from fedpriv.privacy.hospital_state import HospitalPrivacyState, SpentRound
from fedpriv.privacy.ledger import PrivacyLedger


def dp_accounting_epsilon(history, delta):
    """The independent accountant: Google's dp-accounting RDP over the same orders."""
    accountant = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "history",
    [[(1.0, 0.25, 16)], [(0.7, 0.01, 1000)], [(2.0, 0.25, 8), (1.5, 0.1, 30)], [(5.0, 0.5, 3)]],
)
def test_epsilon_agrees_with_dp_accounting(history):
    assert epsilon_spent(history, 1e-5) == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)


@pytest.mark.parametrize("sample_rate", [1e-6, 1e-3, 0.01, 0.1, 1 / 3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.8, 1.0, 2.0, 5.0, 100.0])
def test_rdp_curve_is_opacus_curve_at_every_order(sample_rate, sigma):
    """fedpriv sums the fractional orders' series with numpy: same terms, same stopping rule
    as Opacus' per-term Python loop, so the same curve up to summation order."""
    ours = accounting._rdp_per_step.__wrapped__(sigma, sample_rate)
    opacus = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))
    np.testing.assert_allclose(ours, opacus, rtol=1e-8, atol=1e-11)  # ε moves < 1e-6 over 1e5 steps


def test_a_series_that_would_not_end_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(accounting, "MAX_SERIES_TERMS", 256)  # α = 1.1 at q = 1/3, σ = 1 needs 3922 terms
    with pytest.raises(ArithmeticError, match="did not converge"):
        accounting._rdp_per_step.__wrapped__(1.0, 1 / 3)


@pytest.mark.parametrize("sigma, sample_rate", [(0.0, 0.1), (1.0, 0.0), (1.0, 1.0)])
def test_rdp_edge_cases_are_opacus_own(sigma, sample_rate):
    ours = accounting._rdp_per_step.__wrapped__(sigma, sample_rate)
    opacus = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    np.testing.assert_array_equal(ours, opacus)


@pytest.mark.parametrize("target, sample_rate, steps", [(4.0, 0.05, 60), (1.0, 0.05, 200), (3.0, 0.02, 1000)])
def test_calibrated_sigma_is_the_one_opacus_curves_give(monkeypatch, target, sample_rate, steps):
    """The faster curve changes no plan: the σ search lands on the same σ, bit for bit, as
    with Opacus' own per-order computation — and within tolerance of get_noise_multiplier."""
    fast = calibrate_noise_multiplier.__wrapped__(target, 1e-5, sample_rate, steps)
    monkeypatch.setattr(
        accounting, "_rdp_per_step",
        lambda sigma, q: np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)),
    )
    assert calibrate_noise_multiplier.__wrapped__(target, 1e-5, sample_rate, steps) == fast
    opacus = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=sample_rate, steps=steps, accountant="rdp")
    assert fast == pytest.approx(opacus, rel=0.01)


@pytest.mark.parametrize("target", [1.0, 6.0, 8.0, 20.0])
def test_sigma_calibrated_for_the_whole_run_lands_on_target(target):
    q, per_epoch = poisson_plan(num_records=210, batch_size=64)
    steps = 5 * 2 * per_epoch  # rounds × local epochs × steps per epoch
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps)
    eps = epsilon_spent([(sigma, q, steps)], 1e-5)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    assert dp_accounting_epsilon([(sigma, q, steps)], 1e-5) == pytest.approx(target, rel=0.01)


def test_poisson_plan_matches_opacus_loader_arithmetic():
    assert poisson_plan(210, 64) == (0.25, 4)
    assert poisson_plan(64, 64) == (1.0, 1)
    assert poisson_plan(10, 64) == (1.0, 1)


def test_smaller_epsilon_needs_more_noise():
    q, steps = 0.1, 100
    sigmas = [calibrate_noise_multiplier(e, 1e-5, q, steps) for e in (1.0, 6.0, 12.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2]


def test_ledger_is_cumulative_per_hospital_and_never_resets():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.sync_hospital(0, [(1, 1.0, 0.25, 8)])
    first = ledger.epsilon(0)
    ledger.sync_hospital(1, [(1, 1.0, 0.25, 8)])
    ledger.sync_hospital(0, [(1, 1.0, 0.25, 8), (2, 1.0, 0.25, 8)])
    assert ledger.epsilon(0) > first
    assert ledger.epsilon(0) == pytest.approx(epsilon_spent([(1.0, 0.25, 16)], 1e-5))
    assert ledger.epsilon(1) == pytest.approx(first)
    assert ledger.epsilon(2) == 0.0
    assert ledger.epsilon(0, through_round=1) == pytest.approx(first)  # any past round
    payload = ledger.to_dict([0, 1, 2])
    assert len(payload["entries"]) == 3 and payload["epsilon"]["2"] == 0.0
    assert PrivacyLedger.from_dict(payload).entries == ledger.entries


def test_ledger_refuses_a_hospital_record_that_forgot_a_session():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.sync_hospital(0, [(1, 1.0, 0.25, 8), (2, 1.0, 0.25, 8)])
    with pytest.raises(FedprivError, match="round 2 that the ledger holds"):
        ledger.sync_hospital(0, [(1, 1.0, 0.25, 8)])  # a reset accountant, a lost state file
    with pytest.raises(FedprivError, match="round 1"):
        ledger.sync_hospital(0, [(1, 2.0, 0.25, 8), (2, 1.0, 0.25, 8)])  # history rewritten


def _release_round_4(path, writer):
    for n in range(25):  # each a different release of round 4, as two processes training it would make
        HospitalPrivacyState.record_at(path, SpentRound(4, 1.0, 0.25, 8, f"{writer}-{n}"), 1.0)


def test_two_processes_recording_one_hospital_keep_every_release(tmp_path):
    """Two different releases of one round are two sessions, however the writers interleave
    (once: each read the record, added its own and wrote it back, losing the other's)."""
    path = tmp_path / "hospital_0.json"
    writers = [multiprocessing.get_context("fork").Process(target=_release_round_4, args=(path, w)) for w in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    spent = HospitalPrivacyState.load(path).spent
    assert sorted(s.release_digest for s in spent) == sorted(f"{w}-{n}" for w in "ab" for n in range(25))
    ledger = PrivacyLedger(delta=1e-5)
    ledger.sync_hospital(0, [(s.round, s.noise_multiplier, s.sample_rate, s.steps) for s in spent])
    assert ledger.epsilon(0) == pytest.approx(epsilon_spent([(1.0, 0.25, 8 * 50)], 1e-5))
    with pytest.raises(FedprivError, match="round 4 that the ledger holds"):  # one release forgotten
        ledger.sync_hospital(0, [(4, 1.0, 0.25, 8)] * 49)


@pytest.mark.parametrize("target, rounds", [(1.0, 10), (8.0, 5), (3.0, 50)])
def test_client_level_sigma_without_amplification_matches_dp_accounting(target, rounds):
    sigma = calibrate_noise_multiplier(target, 1e-5, 1.0, rounds)
    ledger = PrivacyLedger(delta=1e-5)
    for r in range(rounds):
        ledger.record_release(r + 1, sigma, 1.0)
    gaussian = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    gaussian.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), rounds))
    assert ledger.client_level_epsilon() == pytest.approx(gaussian.get_epsilon(1e-5), rel=0.01)
    assert ledger.client_level_epsilon() == pytest.approx(target, rel=0.01)
    assert ledger.epsilon(0) == 0.0  # client-level releases are not any hospital's record-level cost
