"""What the coordinator fixes before round 1 of a securely aggregated run: the round's
parameters, checked against the number of sites and the model's size, and under
distributed DP the Skellam noise each site adds.

The noise is sized for the fewest contributions a round may be unmasked with,
min_contributions = ceil(n (1 - dropout)), at least 2: each site adds
mu_total / min_contributions, so any round the coordinator unmasks carries at least
mu_total, the noise that keeps the run within its budget. A round with more contributors
carries more noise and is accounted with what it carries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from common.errors import CohortInputError
from common.privacy.skellam import variance_for_budget
from common.secure_aggregation.parameters import SecAggParameters, default_neighbours, default_threshold
from server.run_config import RunConfig


@dataclass(frozen=True)
class DistributedNoise:
    """The run's client-level budget, which the sites' Skellam noise must keep.

    noise_multiplier: sigma of the aggregate noise in units of its L2 sensitivity; 0
        derives it from the budget over `rounds` releases.
    """

    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float = 0.0


def run_parameters(run: RunConfig, sites: int, dimension: int) -> SecAggParameters:
    """The parameters of a run's rounds of `sites` sites and a model of `dimension`
    parameters: CohortInputError, naming the setting to change, when they cannot work."""
    noise = None
    if run.dp.mechanism.distributed_noise:
        noise = DistributedNoise(
            run.central_dp.client_epsilon, run.central_dp.client_delta, run.training.rounds, run.dp.noise_multiplier
        )
    secure = run.secure
    return plan_parameters(
        sites,
        dimension,
        run.secure_aggregation_clip,
        secure.secure_aggregation_bits,
        secure.secure_aggregation_dropout,
        secure.secure_aggregation_neighbours,
        secure.secure_aggregation_threshold,
        noise,
    )


def plan_parameters(
    sites: int,
    dimension: int,
    clip_norm: float,
    bits: int,
    dropout: float,
    neighbours: int = 0,
    threshold: int = 0,
    noise: DistributedNoise | None = None,
) -> SecAggParameters:
    """The parameters every round of the run uses, validated (CohortInputError names the
    setting to change). `neighbours` and `threshold` 0 take the defaults."""
    if not 0 <= dropout < 1:
        raise CohortInputError(
            f"secure-aggregation-dropout is {dropout}; it is the share of a round's sites that may drop, in [0, 1)"
        )
    k = neighbours or default_neighbours(sites)
    min_contributions = max(2, math.ceil(sites * (1 - dropout) - 1e-9))
    planned = SecAggParameters(
        sites, k, threshold or default_threshold(k), bits, clip_norm, dimension, 0.0, min(min_contributions, sites)
    )
    if noise is not None:
        planned = dataclasses.replace(
            planned, noise_variance=aggregate_variance(planned, noise) / planned.min_contributions
        )
    planned.validate()
    return planned


def aggregate_variance(parameters: SecAggParameters, noise: DistributedNoise) -> float:
    """mu_total: the Skellam variance per coordinate a round's sum must carry."""
    l2, l1 = parameters.sensitivity
    if noise.noise_multiplier > 0:
        return (noise.noise_multiplier * l2) ** 2
    return variance_for_budget(noise.epsilon, noise.delta, noise.rounds, l2, l1)
