"""Flower strategies fedpriv configures, by name (the `strategy=` config group).

All are Flower's own message-API strategies; fedpriv only sets them up for server-side
evaluation (hospitals do not evaluate) and waits for the whole federation to connect.
"""

from __future__ import annotations

from flwr.app import MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
)

from fedpriv.errors import FedprivError
from fedpriv.privacy.plan import central_noise_multiplier
from fedpriv.settings import RunSettings, StrategySettings

#: Metric every hospital reports as 1: the aggregation weight under client-level DP (privacy=central), where a
#: hospital's update must count the same whatever its size (sensitivity C / sampled).
UNIFORM_WEIGHT = "uniform-weight"


def clients_per_round(settings: StrategySettings, num_clients: int) -> int:
    """How many hospitals Flower samples each round (the same rule as FedAvg.configure_train)."""
    if settings.clients_per_round is not None:
        return settings.clients_per_round
    return max(int(num_clients * settings.fraction_train), 1)


def _sampling(settings: StrategySettings, num_clients: int, weighted_by: str) -> dict:
    sampled = clients_per_round(settings, num_clients)
    return {
        "fraction_train": sampled / num_clients,
        "fraction_evaluate": 0.0,
        "min_train_nodes": sampled,
        "min_evaluate_nodes": 0,
        "min_available_nodes": settings.min_available_clients or num_clients,
        "weighted_by_key": weighted_by,
        "train_metrics_aggr_fn": no_metrics_aggregation,
    }


def no_metrics_aggregation(records: list, weighting_key: str) -> MetricRecord:
    """fedpriv reads each hospital's metrics itself (privacy histories are per-hospital lists,
    which Flower's weighted averaging cannot combine)."""
    return MetricRecord()


def fedavg(settings: StrategySettings, sampling: dict) -> Strategy:
    """FedAvg weighted by each hospital's number of training examples."""
    return FedAvg(**sampling)


def fedprox(settings: StrategySettings, sampling: dict) -> Strategy:
    """FedAvg aggregation; hospitals add the proximal pull μ(w − w_global) to their steps."""
    return FedProx(**sampling, proximal_mu=settings.proximal_mu)


def fedadam(settings: StrategySettings, sampling: dict) -> Strategy:
    """Server-side Adam on the averaged update (server learning rate `server_lr`)."""
    return FedAdam(**sampling, eta=settings.server_lr, tau=settings.tau)


def fedyogi(settings: StrategySettings, sampling: dict) -> Strategy:
    """Server-side Yogi on the averaged update (server learning rate `server_lr`)."""
    return FedYogi(**sampling, eta=settings.server_lr, tau=settings.tau)


STRATEGIES = {"fedavg": fedavg, "fedprox": fedprox, "fedadam": fedadam, "fedyogi": fedyogi}


def build_strategy(settings: RunSettings) -> Strategy:
    """The configured Flower strategy; under client-level DP (privacy=central) wrapped in Flower's server-side
    fixed- or adaptive-clipping DP wrapper, with uniform weights.

    Adaptive clipping also releases a noisy count of clipped updates (std σ_b); Flower then
    noises the update with σ_Δ = (σ⁻² − (2σ_b)⁻²)^-½ so that both releases together are a
    Gaussian mechanism with noise multiplier σ (Andrew et al. 2021) — the ledger's σ.
    """
    st, n = settings.strategy, settings.num_clients
    if st.name not in STRATEGIES:
        raise FedprivError(f"strategy={st.name!r} is unknown; choose one of {sorted(STRATEGIES)}")
    central = settings.privacy.central
    strategy = STRATEGIES[st.name](st, _sampling(st, n, UNIFORM_WEIGHT if central else "num-examples"))
    if not central:
        return strategy
    p, sigma, sampled = settings.privacy, central_noise_multiplier(settings), clients_per_round(st, n)
    if p.clipping == "adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            noise_multiplier=sigma,
            num_sampled_clients=sampled,
            initial_clipping_norm=p.update_clip_norm,
            target_clipped_quantile=p.target_clipped_quantile,
            clip_norm_lr=p.clip_norm_lr,
            # Flower's default m/20 only works for hundreds of hospitals; σ_b = max(m/20, σ)
            # keeps the update's noise within 1.16σ for small federations.
            clipped_count_stddev=max(sampled / 20, sigma),
        )
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, noise_multiplier=sigma, clipping_norm=p.update_clip_norm, num_sampled_clients=sampled
    )
