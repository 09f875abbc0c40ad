"""Which sites of a simulation are hostile and how: the `attack`, `attack-sites` and
`attack-scale` settings of a simulation plan (the attacks themselves are in
simulations/attacks.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.config import check_ranges, number
from common.errors import CohortInputError

MODEL_ATTACKS = ("sign-flip", "boost", "nan")
DATA_ATTACKS = ("label-flip", "backdoor")
ATTACKS = (*MODEL_ATTACKS, *DATA_ATTACKS, "silent")


@dataclass(frozen=True)
class AttackSpec:
    """by_site: the attack (one of ATTACKS) of each hostile partition id; attack_scale: the boost factor."""

    by_site: dict[int, str]
    attack_scale: float = number(10.0, 0, 1e6, low_open=True)

    def __post_init__(self) -> None:
        check_ranges(self)
        for attack in self.by_site.values():
            if attack not in ATTACKS:
                raise CohortInputError(f"unknown attack '{attack}'; choose one of: {', '.join(ATTACKS)}")
        if not self.by_site:
            raise CohortInputError("attack-sites names no site; give partition ids ([0, 3]) or a fraction (0.2)")

    @classmethod
    def from_settings(cls, attack: Any, sites: Any, scale: Any, num_sites: int) -> AttackSpec:
        """attack: one name for every hostile site, or a list with one name per site in attack-sites."""
        hostile = hostile_sites(sites, num_sites)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise CohortInputError(f"attack-scale is {scale!r}; it must be a number")
        if isinstance(attack, str):
            return cls(dict.fromkeys(hostile, attack), float(scale))
        if isinstance(attack, list) and isinstance(sites, list) and len(attack) == len(sites) == len(hostile):
            return cls(dict(zip(sites, map(str, attack), strict=True)), float(scale))
        raise CohortInputError("attack is a list: give attack-sites as a list of the same length, one site per attack")

    def attack_of(self, partition_id: int) -> str | None:
        return self.by_site.get(partition_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": {str(site): attack for site, attack in sorted(self.by_site.items())},
            "scale": self.attack_scale,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttackSpec:
        return cls({int(site): str(attack) for site, attack in data["sites"].items()}, float(data["scale"]))


def hostile_sites(value: Any, num_sites: int) -> tuple[int, ...]:
    """attack-sites as partition ids ([0, 3]) or a fraction of the sites (0.2 -> the last 20%)."""
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        outside = [v for v in value if not 0 <= v < num_sites]
        if outside:
            raise CohortInputError(f"attack-sites {outside} are not sites of this simulation (0..{num_sites - 1})")
        return tuple(sorted(set(value)))
    if isinstance(value, float) and 0 < value < 1:
        count = max(1, round(value * num_sites))
        return tuple(range(num_sites - count, num_sites))
    raise CohortInputError(f"attack-sites is {value!r}; give a list of site numbers ([0, 3]) or a fraction in (0, 1)")
