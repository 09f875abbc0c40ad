"""Canary clients for the one-shot estimate of client-level privacy (Andrew et al., "One-shot
Empirical Privacy Estimation for Federated Learning", ICLR 2024).

A canary client is an extra simulated client (DataConfig.audit_canary_clients of them,
after the run's real sites) whose update, whenever it is sampled, is its own fixed random
unit direction in the model's parameter space (every array of the model, flattened as
common.secure_aggregation.model_vector flattens an update), large enough that client-level
clipping cuts it to exactly the round's clip norm. Client-level DP must hide any one
client's whole update, so it must hide these; the auditor measures how much of each
direction the final model shows (audit.one_shot).

Canary client i's direction comes from the run's seed and i alone, so the auditor
regenerates every direction from config.json; directions i >= audit_canary_clients were
never inserted and give the estimate its held-out null. Each canary client keeps its own
state (ledger, key) under the federation home's CANARY_CLIENT_DIR: it spends no real
site's budget, and `cohort audit` of a run, which reads its sites' state directories,
does not list it.
"""

from __future__ import annotations

import numpy as np

from server.run_config import DataConfig

CANARY_CLIENT_DIR = "audit-canary-clients"
# Kept apart from every other stream of the run's seed.
_DIRECTION_STREAM = 0xC11E


def canary_client_name(index: int) -> str:
    return f"canary-{index}"


def canary_client_names(config: DataConfig) -> frozenset[str]:
    """The names the run's canary clients report under (none without the setting)."""
    return frozenset(canary_client_name(i) for i in range(config.audit_canary_clients))


def canary_direction(seed: int, index: int, dimension: int) -> np.ndarray:
    """Canary `index`'s unit direction in R^dimension: uniform on the sphere (a normalised
    standard Gaussian), drawn from the run's seed and the index alone."""
    direction = np.random.default_rng([seed, _DIRECTION_STREAM, index]).standard_normal(dimension)
    return direction / np.linalg.norm(direction)
