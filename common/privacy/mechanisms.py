"""The DP mechanisms Cohort applies, one registry entry each, with what each asks of the
sites, of the server and of the strategy.

A run names a DP level (or no DP); the level's mechanism is what every ledger record of the
run names, at the sites and at the server, and what the server's checks expect a site's
signed entry to name. Both sides read it from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DPLevel(StrEnum):
    """What one unit of privacy protects: one example (at each site), or one client's
    whole contribution (at the server)."""

    SAMPLE = "sample"
    CLIENT = "client"


class Mechanism(StrEnum):
    """The mechanism a ledger record names."""

    SAMPLE_LEVEL_DP_SGD = "sample-level-dp-sgd"
    CLIENT_LEVEL_DP_FEDAVG = "client-level-dp-fedavg"
    CLIENT_LEVEL_DISTRIBUTED_SKELLAM = "client-level-distributed-skellam"
    NONE = "none"


@dataclass(frozen=True)
class MechanismSpec:
    """mechanism: its name in ledger records.
    site_noise: each site noises its own update (Opacus DP-SGD), so a site's ledger records
        its rounds as releases; otherwise as 'non-private' (no guarantee of the site's own).
    server_noise: the server noises the aggregate (Flower's DP wrappers) and keeps the run's
        ledger and budget.
    distributed_noise: each site adds its share of Skellam noise to its update before
        secure aggregation masks it, so the sum the server unmasks is already noised; the
        server accounts for that noise and keeps the run's ledger and budget.
    equal_shares: the noise is scaled for the plain mean of m equally weighted updates, so
        the strategy must aggregate by that mean and every update weigh the same.
    """

    mechanism: Mechanism
    site_noise: bool = False
    server_noise: bool = False
    distributed_noise: bool = False
    equal_shares: bool = False

    @property
    def server_accounts(self) -> bool:
        """Client-level DP: the server keeps the run's budget and ledger, whoever adds the noise."""
        return self.server_noise or self.distributed_noise


MECHANISMS: dict[Mechanism, MechanismSpec] = {
    Mechanism.SAMPLE_LEVEL_DP_SGD: MechanismSpec(Mechanism.SAMPLE_LEVEL_DP_SGD, site_noise=True),
    Mechanism.CLIENT_LEVEL_DP_FEDAVG: MechanismSpec(
        Mechanism.CLIENT_LEVEL_DP_FEDAVG, server_noise=True, equal_shares=True
    ),
    Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM: MechanismSpec(
        Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM, distributed_noise=True, equal_shares=True
    ),
    Mechanism.NONE: MechanismSpec(Mechanism.NONE),
}

# (DP level, secure aggregation) -> the mechanism: under secure aggregation the server never
# sees an update to noise, so client-level noise is the sites' (distributed DP).
_OF_LEVEL = {
    (DPLevel.SAMPLE, False): Mechanism.SAMPLE_LEVEL_DP_SGD,
    (DPLevel.SAMPLE, True): Mechanism.SAMPLE_LEVEL_DP_SGD,
    (DPLevel.CLIENT, False): Mechanism.CLIENT_LEVEL_DP_FEDAVG,
    (DPLevel.CLIENT, True): Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM,
}


def mechanism_of(enabled: bool, level: DPLevel, secure_aggregation: bool = False) -> MechanismSpec:
    """The mechanism a run applies: its DP level's, or none when DP is off."""
    return MECHANISMS[_OF_LEVEL[(level, secure_aggregation)] if enabled else Mechanism.NONE]
