"""Flower's own aggregation strategies, chosen by name from the run config."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from common.config import TrainingConfig


def build_strategy(training: TrainingConfig, num_sites: int) -> Strategy:
    """Every site evaluates every round; training samples fraction_train of the sites.

    The minimum is capped at the sites present, so a 1-site simulation does not wait
    forever for a second one.
    """
    minimum = max(1, min(training.min_sites, num_sites))
    common = {
        "fraction_train": training.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum,
        "min_available_nodes": minimum,
    }
    if training.strategy == "fedprox":
        return FedProx(proximal_mu=training.proximal_mu, **common)
    if training.strategy == "fedadam":
        return FedAdam(eta=training.server_learning_rate, eta_l=training.learning_rate, **common)
    if training.strategy == "fedavgm":
        return FedAvgM(server_learning_rate=training.server_learning_rate, server_momentum=training.server_momentum, **common)
    if training.strategy == "fedmedian":
        return FedMedian(**common)
    if training.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=training.trimmed_beta, **common)
    if training.strategy == "krum":
        return Krum(num_malicious_nodes=training.krum_byzantine, **common)
    return FedAvg(**common)
