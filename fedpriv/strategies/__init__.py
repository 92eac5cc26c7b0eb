"""Flower strategies fedpriv configures, by name (the `strategy=` config group).

All are Flower's own message-API strategies; fedpriv only sets them up for server-side
evaluation (hospitals do not evaluate) and waits for the whole federation to connect, wraps
them for client-level DP (client_level_dp) and for seeded, hospital-ordered sampling and
aggregation (hospital_ordered, applied by fedpriv.federation).
"""

from __future__ import annotations

from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fedpriv.errors import FedprivError
from fedpriv.protocol import NUM_EXAMPLES, UNIFORM_WEIGHT
from fedpriv.settings import PrivacySettings, StrategySettings
from fedpriv.strategies.client_level_dp import with_client_level_dp


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


def fedavgm(settings: StrategySettings, sampling: dict) -> Strategy:
    """FedAvg, then SGD with momentum on the server over the averaged update (Hsu et al.
    2019): the momentum hospitals' local optimizers restart every round carries across rounds."""
    return FedAvgM(**sampling, server_learning_rate=settings.server_lr, server_momentum=settings.server_momentum)


def fedprox(settings: StrategySettings, sampling: dict) -> Strategy:
    """FedAvg aggregation; hospitals add the proximal pull μ(w − w_global) to their steps."""
    return FedProx(**sampling, proximal_mu=settings.proximal_mu)


def fedadam(settings: StrategySettings, sampling: dict) -> Strategy:
    """Server-side Adam on the averaged update (server learning rate `server_lr`)."""
    return FedAdam(**sampling, eta=settings.server_lr, tau=settings.tau)


def fedyogi(settings: StrategySettings, sampling: dict) -> Strategy:
    """Server-side Yogi on the averaged update (server learning rate `server_lr`)."""
    return FedYogi(**sampling, eta=settings.server_lr, tau=settings.tau)


STRATEGIES = {"fedavg": fedavg, "fedavgm": fedavgm, "fedprox": fedprox, "fedadam": fedadam, "fedyogi": fedyogi}


def build_strategy(
    settings: StrategySettings, privacy: PrivacySettings, num_clients: int, central_noise_multiplier: float | None
) -> Strategy:
    """The configured Flower strategy; under client-level DP (privacy=central, σ =
    `central_noise_multiplier`) wrapped in Flower's server-side DP wrapper, with uniform weights."""
    if settings.name not in STRATEGIES:
        raise FedprivError(f"strategy={settings.name!r} is unknown; choose one of {sorted(STRATEGIES)}")
    central = privacy.central
    strategy = STRATEGIES[settings.name](settings, _sampling(settings, num_clients, UNIFORM_WEIGHT if central else NUM_EXAMPLES))
    if not central:
        return strategy
    return with_client_level_dp(strategy, privacy, central_noise_multiplier, clients_per_round(settings, num_clients))
