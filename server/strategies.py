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

from common import protocol
from common.config import RunConfig, TrainingConfig


def build_strategy(run: RunConfig, num_sites: int) -> Strategy:
    """Every site evaluates every round; training samples fraction_train of the sites.

    Updates are weighted by their sites' example counts, except under client-level DP,
    whose noise is scaled for equal shares.
    """
    training = run.training
    minimum = _minimum_sites(training, num_sites)
    common = {
        "fraction_train": training.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum,
        "min_available_nodes": minimum,
    }
    if run.dp.client_level:
        common["weighted_by_key"] = protocol.UNIT_WEIGHT
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


def sample_size(training: TrainingConfig, num_sites: int) -> int:
    """How many sites Flower's strategies sample for training each round."""
    return max(int(num_sites * training.fraction_train), _minimum_sites(training, num_sites))


def _minimum_sites(training: TrainingConfig, num_sites: int) -> int:
    """Capped at the sites present, so a 1-site simulation does not wait forever for a second."""
    return max(1, min(training.min_sites, num_sites))
