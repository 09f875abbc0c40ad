"""The server optimizer's state that some of Flower's strategies keep between rounds
(FedAdam, FedYogi, FedAvgM), checkpointed with the model so a resumed run continues it."""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt


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
            values = {
                key.split("/", 1)[1]: tensor.numpy() for key, tensor in state.items() if key.startswith(f"{moment}/")
            }
            if values:
                setattr(strategy, moment, values)
    momentum = [state[key].numpy() for key in sorted(k for k in state if k.startswith("momentum/"))]
    if isinstance(strategy, FedAvgM) and momentum:
        strategy.momentum_vector = momentum
