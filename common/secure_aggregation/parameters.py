"""The parameters of one round of secure aggregation, which every site of the round
receives with the coordinator's first message and checks before it draws a key.

The integer encoding is fixed by two rules, both checked here on each side:
- scale: an update clipped to L2 norm C is multiplied by gamma = sqrt(d) / (ROUNDING_SHARE C)
  and rounded, so rounding (less than 1 per coordinate) adds at most ROUNDING_SHARE x C to
  its L2 norm, and to the sensitivity the DP noise is sized for;
- bits: the sum of n such vectors, each coordinate at most gamma C + 1 in magnitude, plus
  the sites' Skellam noise (beyond its tail_bound with probability OVERFLOW_PROBABILITY),
  must fit in [-2^(b-1), 2^(b-1)): the modular sum of honest inputs never wraps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import CohortInputError
from common.privacy.skellam import rounded_sensitivity, tail_bound
from common.secure_aggregation.field import MAX_BITS

ROUNDING_SHARE = 1e-3
# The chance that one round's noise carries a coordinate of the sum past the modulus.
OVERFLOW_PROBABILITY = 2.0**-40
MIN_BITS = 8


@dataclass(frozen=True)
class SecAggParameters:
    """One round's secure aggregation.

    sites: n, the sites asked to take part in the round.
    neighbours: k, the other sites each site shares its secrets with and masks against:
        n - 1 is the complete graph of Bonawitz et al. (CCS 2017); fewer, an even k, is
        SecAgg+'s random k-regular ring (Bell et al., CCS 2020).
    threshold: t, the shares that rebuild one of a site's secrets. More than half of the
        k + 1 holders (its neighbours and itself), so that the coordinator cannot collect
        both a site's mask seed and its masking key (each holder reveals one or the
        other); at most k + 1 - (the dropouts a neighbourhood may lose).
    bits: b, masked inputs are vectors in Z/2^b.
    clip_norm: C, the L2 bound every site clips its update to.
    dimension: d, the number of model parameters, in the global model's order.
    noise_variance: mu, the Skellam noise variance each site adds to every coordinate of its
        integer update (0: no distributed DP noise).
    min_contributions: the fewest masked inputs the coordinator unmasks a sum of; a round
        with fewer is abandoned (the noise is sized for at least this many sites).
    """

    sites: int
    neighbours: int
    threshold: int
    bits: int
    clip_norm: float
    dimension: int
    noise_variance: float
    min_contributions: int

    @property
    def scale(self) -> float:
        """gamma: the factor from an update to the integers a site masks."""
        return math.sqrt(self.dimension) / (ROUNDING_SHARE * self.clip_norm)

    @property
    def sensitivity(self) -> tuple[float, float]:
        """(D2, D1) of one site's integer contribution to the sum."""
        return rounded_sensitivity(self.clip_norm, self.scale, self.dimension)

    def coordinate_bound(self, contributions: int) -> float:
        """The largest magnitude a coordinate of the integer sum of `contributions` honest
        inputs reaches, except with probability OVERFLOW_PROBABILITY."""
        signal = contributions * (self.scale * self.clip_norm + 1)
        return signal + tail_bound(contributions * self.noise_variance, self.dimension, OVERFLOW_PROBABILITY)

    def norm_bound(self, contributions: int) -> float:
        """The largest L2 norm of that integer sum, except with probability OVERFLOW_PROBABILITY."""
        noise = tail_bound(contributions * self.noise_variance, self.dimension, OVERFLOW_PROBABILITY)
        return contributions * self.sensitivity[0] + math.sqrt(self.dimension) * noise

    def bits_needed(self) -> int:
        """The fewest bits whose signed range holds the sum of every site's input."""
        return math.ceil(math.log2(self.coordinate_bound(self.sites) + 1)) + 1

    def validate(self) -> None:
        """Raise CohortInputError naming the first parameter that cannot work, and its fix."""
        n, k, t = self.sites, self.neighbours, self.threshold
        if n < 2:
            raise CohortInputError(f"secure aggregation needs at least 2 sites in a round, this one has {n}")
        if not (k == n - 1 or (2 <= k < n - 1 and k % 2 == 0)):
            raise CohortInputError(
                f"secure-aggregation-neighbours is {k} for {n} sites; use "
                f"{n - 1} (every other site) or an even number from 2 to {n - 2}"
            )
        if not (k + 1) / 2 < t <= k + 1:
            raise CohortInputError(
                f"secure-aggregation-threshold is {t} with {k} neighbours; it must be more than half of the {k + 1} "
                f"holders of a site's shares and at most {k + 1}: use {(k + 1) // 2 + 1} to {k + 1}"
            )
        if not 2 <= self.min_contributions <= n:
            raise CohortInputError(
                f"a round must be unmasked with 2 to {n} sites' inputs, not {self.min_contributions}; lower "
                "secure-aggregation-dropout"
            )
        if not self.clip_norm > 0 or not math.isfinite(self.clip_norm):
            raise CohortInputError(
                f"the secure aggregation clip norm is {self.clip_norm}; it must be a positive number"
            )
        if self.dimension < 1:
            raise CohortInputError(f"the model has {self.dimension} parameters; secure aggregation needs at least one")
        if not self.noise_variance >= 0 or not math.isfinite(self.noise_variance):
            raise CohortInputError(f"the Skellam noise variance is {self.noise_variance}; it must be >= 0")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise CohortInputError(f"secure-aggregation-bits is {self.bits}; use {MIN_BITS} to {MAX_BITS}")
        needed = self.bits_needed()
        if needed > self.bits:
            raise CohortInputError(
                f"secure-aggregation-bits = {self.bits} cannot hold the sum of {n} "
                f"sites' updates of {self.dimension:,} parameters (it needs "
                f"{needed} bits); raise secure-aggregation-bits to at least {needed}"
            )

    def to_record(self) -> dict[str, Any]:
        return {_key(name): value for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SecAggParameters:
        """Read and validate parameters a message carried; CohortInputError if they are
        missing, of the wrong type or cannot work."""
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            value = record.get(_key(spec.name))
            kind = float if spec.type == "float" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise CohortInputError(f"the secure aggregation parameter {spec.name} is missing or not a {spec.type}")
            values[spec.name] = kind(value)
        parameters = cls(**values)
        parameters.validate()
        return parameters


def _key(name: str) -> str:
    return "secagg-" + name.replace("_", "-")


def default_neighbours(sites: int) -> int:
    """k for n sites: every other site up to 13 sites, then the even number nearest
    above 3 log2 n (a logarithmic degree, as SecAgg+ proposes)."""
    k = 2 * math.ceil(1.5 * math.log2(sites)) if sites > 1 else 1
    return min(sites - 1, k)


def default_threshold(neighbours: int) -> int:
    """t: the smallest majority of a site's k + 1 share holders, which tolerates the most
    dropouts while no one can collect both of a site's secrets."""
    return (neighbours + 1) // 2 + 1
