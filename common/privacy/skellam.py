"""The privacy of the distributed Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021).

Each contributing site adds independent Skellam noise of variance mu_i to every
coordinate of its integer update; Skellam noise is closed under summation, so the sum the
coordinator unmasks carries exactly Skellam noise of variance sum(mu_i) over the sites
that contributed (a site that dropped took its noise with it). With integer L2 and L1
sensitivities D2 and D1 of the integer sum, one release is (alpha, eps(alpha))-RDP for
every integer alpha > 1 with (the paper's Corollary 3.6, mu the variance per coordinate)

    eps(alpha) = alpha D2^2 / (2 mu) + min( ((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu) ).

The first term is the Gaussian mechanism's; the second is the price of discreteness,
negligible once mu >> D2. Releases compose by adding RDP at each order, and RDP becomes
(epsilon, delta) by Opacus' conversion (Balle et al. 2020), as for every other epsilon in
Cohort. dp-accounting has no Skellam event, hence this module; tests/test_skellam.py
checks the bound against the Renyi divergence summed exactly over the pmfs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from common.errors import CohortInputError

# Integer orders only: the bound is proved for integer alpha > 1.
ORDERS = np.arange(2, 257, dtype=np.float64)


@dataclass(frozen=True)
class SkellamRelease:
    """One release of an integer sum with Skellam noise, in the sum's integer units.

    variance: mu, the noise variance per coordinate: the sum of the contributing sites'.
    l2_sensitivity, l1_sensitivity: D2 and D1, how far one site's contribution can move
        the integer sum (after its clipping, scaling and rounding).
    """

    variance: float
    l2_sensitivity: float
    l1_sensitivity: float

    @property
    def noise_multiplier(self) -> float:
        """The noise's standard deviation in units of the L2 sensitivity (the Gaussian sigma
        it resembles; what the ledger and the terminal show)."""
        return math.sqrt(self.variance) / self.l2_sensitivity

    def rdp(self, orders: np.ndarray = ORDERS) -> np.ndarray:
        return rdp_bound(orders, self.variance, self.l2_sensitivity, self.l1_sensitivity)

    def details(self, sites: Iterable[str]) -> str:
        """The release as a ledger record's mechanism_details (canonical JSON), with the
        sites whose inputs and noise it holds."""
        figures = {
            "variance": self.variance,
            "l2_sensitivity": self.l2_sensitivity,
            "l1_sensitivity": self.l1_sensitivity,
        }
        return json.dumps({**figures, "sites": sorted(sites)}, sort_keys=True)

    @classmethod
    def from_details(cls, text: str) -> SkellamRelease:
        """The release a ledger record's mechanism_details describes."""
        details = json.loads(text)
        return cls(float(details["variance"]), float(details["l2_sensitivity"]), float(details["l1_sensitivity"]))


def rdp_bound(orders: np.ndarray, variance: float, l2_sensitivity: float, l1_sensitivity: float) -> np.ndarray:
    """The Skellam mechanism's RDP at each integer order (the paper's Corollary 3.6)."""
    mu, d2, d1 = variance, l2_sensitivity, l1_sensitivity
    gaussian = orders * d2**2 / (2 * mu)
    discreteness = np.minimum(((2 * orders - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
    return gaussian + discreteness


def epsilon(releases: Iterable[SkellamRelease], delta: float) -> float:
    """(epsilon, delta) of the composition of `releases`."""
    from opacus.accountants.analysis.rdp import (
        get_privacy_spent,
    )  # here: Opacus loads PyTorch, which a site's key stages do without

    total = sum((release.rdp() for release in releases), start=np.zeros_like(ORDERS))
    if not total.any():
        return 0.0
    with warnings.catch_warnings():  # Opacus warns when the best order is an end of the range
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    return float(eps)


def rounded_sensitivity(clip_norm: float, scale: float, dimension: int) -> tuple[float, float]:
    """(D2, D1) of one site's integer contribution: its update clipped to L2 norm
    `clip_norm`, multiplied by `scale` and rounded coordinate-wise (up or down, so each
    coordinate moves by less than 1: at most sqrt(dimension) in L2); D1 <= sqrt(d) D2."""
    l2 = scale * clip_norm + math.sqrt(dimension)
    return l2, l2 * math.sqrt(dimension)


def variance_for_budget(
    target_epsilon: float, delta: float, releases: int, l2_sensitivity: float, l1_sensitivity: float
) -> float:
    """The smallest noise variance (within 1% of epsilon) whose `releases` releases stay
    within `target_epsilon`: the bisection Cohort's Gaussian noise uses, over sigma =
    sqrt(variance) / D2, with every epsilon from `epsilon`."""
    from common.privacy.accounting import smallest_noise_multiplier  # here: it loads PyTorch, as `epsilon` does

    def epsilon_at(sigma: float) -> float:
        return epsilon(
            [SkellamRelease((sigma * l2_sensitivity) ** 2, l2_sensitivity, l1_sensitivity)] * releases, delta
        )

    def exhausted() -> CohortInputError:
        return CohortInputError(
            f"no noise keeps {releases} releases within epsilon {target_epsilon:g} at delta {delta:g}; raise "
            "client-epsilon or run fewer rounds"
        )

    return (smallest_noise_multiplier(epsilon_at, target_epsilon, exhausted) * l2_sensitivity) ** 2


def tail_bound(variance: float, coordinates: int, probability: float) -> float:
    """A t with P(some of `coordinates` Skellam(variance) values exceeds t in magnitude) <=
    `probability`, from the Chernoff bound P(X >= t) <= exp(mu (cosh s - 1) - s t) at its
    best s = asinh(t / mu) and a union bound over both tails of every coordinate.
    0 for no noise."""
    if variance == 0:
        return 0.0
    budget = math.log(probability / (2 * coordinates))

    def log_tail(t: float) -> float:
        ratio = t / variance
        return variance * (math.sqrt(1 + ratio * ratio) - 1) - t * math.asinh(ratio)

    low, high = 0.0, math.sqrt(variance)
    while log_tail(high) > budget:
        low, high = high, 2 * high
    while high - low > 1e-6 * high:
        middle = (low + high) / 2
        if log_tail(middle) > budget:
            low = middle
        else:
            high = middle
    return math.ceil(high)
