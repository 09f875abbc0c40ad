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
    NONE = "none"


@dataclass(frozen=True)
class MechanismSpec:
    """mechanism: its name in ledger records.
    site_noise: each site noises its own update (Opacus DP-SGD), so a site's ledger records
        its rounds as releases; otherwise as 'non-private' (no guarantee of the site's own).
    server_noise: the server noises the aggregate (Flower's DP wrappers) and keeps the run's
        ledger and budget.
    equal_shares: the noise is scaled for the plain mean of m equally weighted updates, so
        the strategy must aggregate by that mean and every update weigh the same.
    """

    mechanism: Mechanism
    site_noise: bool = False
    server_noise: bool = False
    equal_shares: bool = False


MECHANISMS: dict[Mechanism, MechanismSpec] = {
    Mechanism.SAMPLE_LEVEL_DP_SGD: MechanismSpec(Mechanism.SAMPLE_LEVEL_DP_SGD, site_noise=True),
    Mechanism.CLIENT_LEVEL_DP_FEDAVG: MechanismSpec(Mechanism.CLIENT_LEVEL_DP_FEDAVG, server_noise=True, equal_shares=True),
    Mechanism.NONE: MechanismSpec(Mechanism.NONE),
}

_OF_LEVEL = {DPLevel.SAMPLE: Mechanism.SAMPLE_LEVEL_DP_SGD, DPLevel.CLIENT: Mechanism.CLIENT_LEVEL_DP_FEDAVG}


def mechanism_of(enabled: bool, level: DPLevel) -> MechanismSpec:
    """The mechanism a run applies: its DP level's, or none when DP is off."""
    return MECHANISMS[_OF_LEVEL[level] if enabled else Mechanism.NONE]
