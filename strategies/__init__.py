"""Flower strategies fedpriv configures, by name (the `strategy=` config group).

All are Flower's own message-API strategies; fedpriv only sets them up for server-side
evaluation (hospitals do not evaluate) and waits for the whole federation to connect.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from fedpriv.errors import FedprivError
from fedpriv.settings import StrategySettings


def _sampling(settings: StrategySettings, num_clients: int) -> dict:
    return {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": num_clients,
    }


def fedavg(settings: StrategySettings, num_clients: int) -> Strategy:
    """FedAvg weighted by each hospital's number of training examples."""
    return FedAvg(**_sampling(settings, num_clients))


def fedprox(settings: StrategySettings, num_clients: int) -> Strategy:
    """FedAvg aggregation; hospitals add the proximal pull μ(w − w_global) to their steps."""
    return FedProx(**_sampling(settings, num_clients), proximal_mu=settings.proximal_mu)


def fedadam(settings: StrategySettings, num_clients: int) -> Strategy:
    """Server-side Adam on the averaged update (server learning rate `server_lr`)."""
    return FedAdam(**_sampling(settings, num_clients), eta=settings.server_lr, tau=settings.tau)


def fedyogi(settings: StrategySettings, num_clients: int) -> Strategy:
    """Server-side Yogi on the averaged update (server learning rate `server_lr`)."""
    return FedYogi(**_sampling(settings, num_clients), eta=settings.server_lr, tau=settings.tau)


STRATEGIES = {"fedavg": fedavg, "fedprox": fedprox, "fedadam": fedadam, "fedyogi": fedyogi}


def build_strategy(settings: StrategySettings, num_clients: int) -> Strategy:
    if settings.name not in STRATEGIES:
        raise FedprivError(f"strategy={settings.name!r} is unknown; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[settings.name](settings, num_clients)
