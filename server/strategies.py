"""Flower's own aggregation strategies, chosen by name from the run config, and the
server-optimizer state some of them keep between rounds (checkpointed with the model)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from common.config import RunConfig, TrainingConfig
from server.aggregation_weight import AGGREGATION_WEIGHT, TRAIN_LOSS


def build_strategy(run: RunConfig, num_sites: int) -> Strategy:
    """Training samples fraction_train of the sites each round, validation
    fraction_evaluate of them (by default the same share).

    Updates are weighted by the weight the server assigned after its checks
    (server.aggregation_weight), never by a count the site reports.
    """
    training = run.training
    minimum = _minimum_sites(training, num_sites)
    common = {
        "fraction_train": training.fraction_train,
        "fraction_evaluate": training.evaluate_share,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum,
        "min_available_nodes": minimum,
        "weighted_by_key": AGGREGATION_WEIGHT,
    }
    hostile = training.byzantine_sites
    if training.strategy == "fedprox":
        return FedProx(proximal_mu=training.proximal_mu, **common)
    if training.strategy == "fedadam":
        return FedAdam(eta=training.server_learning_rate, eta_l=training.learning_rate, **common)
    if training.strategy == "fedyogi":
        return FedYogi(eta=training.server_learning_rate, eta_l=training.learning_rate, **common)
    if training.strategy == "fedavgm":
        return FedAvgM(server_learning_rate=training.server_learning_rate, server_momentum=training.server_momentum, **common)
    if training.strategy == "fedmedian":
        return FedMedian(**common)
    if training.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=training.trimmed_beta, **common)
    if training.strategy == "krum":
        return Krum(num_malicious_nodes=hostile, **common)
    if training.strategy == "multikrum":
        return MultiKrum(num_malicious_nodes=hostile, num_nodes_to_select=training.krum_selected or max(1, num_sites - hostile), **common)
    if training.strategy == "bulyan":
        return Bulyan(num_malicious_nodes=hostile, **common)
    if training.strategy == "qfedavg":
        return QFedAvg(client_learning_rate=training.learning_rate, q=training.qfedavg_q, train_loss_key=TRAIN_LOSS, **common)
    return FedAvg(**common)


def sample_size(training: TrainingConfig, num_sites: int) -> int:
    """How many sites Flower's strategies sample for training each round."""
    return max(int(num_sites * training.fraction_train), _minimum_sites(training, num_sites))


def _minimum_sites(training: TrainingConfig, num_sites: int) -> int:
    """Capped at the sites present, so a 1-site simulation does not wait forever for a second."""
    return max(1, min(training.min_sites, num_sites))


def optimizer_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """The server optimizer's moments (FedAdam, FedYogi: m_t, v_t; FedAvgM: momentum),
    flat as 'm_t/<array>' tensors, so a resumed run continues them instead of restarting.

    Their current arrays need no saving: they are the global model, which configure_train
    hands them again.
    """
    state: dict[str, torch.Tensor] = {}
    if isinstance(strategy, FedOpt):
        for moment in ("m_t", "v_t"):
            for name, value in (getattr(strategy, moment) or {}).items():
                state[f"{moment}/{name}"] = torch.from_numpy(np.array(value))
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        for index, value in enumerate(strategy.momentum_vector):
            state[f"momentum/{index:04d}"] = torch.from_numpy(np.array(value))
    return state


def restore_optimizer_state(strategy: Strategy, state: dict[str, torch.Tensor]) -> None:
    """Put back what optimizer_state saved (nothing for strategies without one)."""
    if isinstance(strategy, FedOpt):
        for moment in ("m_t", "v_t"):
            values = {key.split("/", 1)[1]: tensor.numpy() for key, tensor in state.items() if key.startswith(f"{moment}/")}
            if values:
                setattr(strategy, moment, values)
    momentum = [state[key].numpy() for key in sorted(k for k in state if k.startswith("momentum/"))]
    if isinstance(strategy, FedAvgM) and momentum:
        strategy.momentum_vector = momentum
