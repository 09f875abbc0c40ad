"""The noise of central DP-FedAvg, and the one noise multiplier that accounts for it.

Flower's DP strategy wrappers add Gaussian noise of std sigma_u * C / m to the mean of m
clipped client updates; with adaptive clipping they also publish a count of clipped
updates with Gaussian noise of std sigma_b. Both releases of a round see the same
clients, so together they are one Gaussian mechanism with
    sigma = (sigma_u^-2 + sigma_b^-2)^(-1/2)
in units of each release's sensitivity, and that sigma is what the accountant composes.

Two choices keep the figure honest:
- The count's sensitivity is taken as 1. Flower counts the clipped updates as 0/1 bits,
  so one client moves the count by 1; Andrew et al. centre the bits (sensitivity 1/2) and
  Flower derives sigma_u with that convention, which would overstate sigma.
- No amplification by sampling is claimed (sample rate 1 per round): Flower samples a
  fixed number of clients without replacement, which the Poisson analysis does not
  cover. Every round counts as a full Gaussian release on the clients it sampled, the
  conservative assumption of Flower's own accountant.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import DPConfig
from common.errors import CohortInputError
from common.privacy.accounting import derive_noise_multiplier
from server.run_config import CentralDPConfig

# The sample rate recorded for a client-level release: no amplification is claimed.
NO_AMPLIFICATION = 1.0


@dataclass(frozen=True)
class ClientLevelNoise:
    """How much noise one DP-FedAvg round adds, in units of each release's sensitivity.

    accounted: sigma of the single Gaussian mechanism both releases amount to; the
        figure the ledger records and the accountant composes.
    update: sigma_u, the noise on the mean update in units of C / m.
    clipped_count: sigma_b, the noise on the count of clipped updates (0 without
        adaptive clipping).
    flower: the noise multiplier handed to Flower's wrapper, which derives sigma_u from
        it as (flower^-2 - (2 sigma_b)^-2)^(-1/2).
    """

    accounted: float
    update: float
    clipped_count: float
    flower: float


def client_level_noise(dp: DPConfig, central: CentralDPConfig, rounds: int, sample_size: int) -> ClientLevelNoise:
    """The noise that keeps `rounds` releases within the run's client-level budget.

    The accounted sigma is dp.noise_multiplier, or the smallest sigma whose `rounds`
    releases stay within client_epsilon.
    """
    accounted = dp.noise_multiplier or derive_noise_multiplier(
        central.client_epsilon, central.client_delta, NO_AMPLIFICATION, rounds, dp.accountant
    )
    if dp.client_clipping == "fixed":
        return ClientLevelNoise(accounted=accounted, update=accounted, clipped_count=0.0, flower=accounted)
    count = central.clipped_count_stddev or max(sample_size / 20, 2 * accounted)
    if count <= accounted:
        raise CohortInputError(
            f"clipped-count-stddev {count:g} must exceed the noise multiplier {accounted:.3f}, or the count of clipped "
            f"updates alone would spend more than the whole budget; raise it (e.g. to {2 * accounted:.3f}) or set 0"
        )
    update = (accounted**-2 - count**-2) ** -0.5
    flower = (update**-2 + (2 * count) ** -2) ** -0.5
    return ClientLevelNoise(accounted=accounted, update=update, clipped_count=count, flower=flower)
