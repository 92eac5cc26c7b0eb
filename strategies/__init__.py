"""Flower strategies fedpriv configures, by name (the `strategy=` config group)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from fedpriv.errors import FedprivError
from fedpriv.settings import StrategySettings


def fedavg(settings: StrategySettings, num_clients: int) -> Strategy:
    """FedAvg weighted by each hospital's number of training examples; server-side
    evaluation only (hospitals do not evaluate)."""
    return FedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=num_clients,
    )


STRATEGIES = {"fedavg": fedavg}


def build_strategy(settings: StrategySettings, num_clients: int) -> Strategy:
    if settings.name not in STRATEGIES:
        raise FedprivError(f"strategy={settings.name!r} is unknown; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[settings.name](settings, num_clients)
