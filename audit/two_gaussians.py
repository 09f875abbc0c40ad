"""The (epsilon, delta) that tells two one-dimensional Gaussians apart.

The one-shot estimate (audit.one_shot) ends in the privacy of a mechanism whose output is
N(mu_0, s_0^2) on one neighbour and N(mu_1, s_1^2) on the other: the null cosines of
canaries never inserted, and the fitted cosines of those inserted. With unequal variances
there is no closed form for epsilon, so it is found numerically from the exact privacy
profile delta(epsilon) (Balle and Wang's hockey-stick divergence, both directions):

    delta(epsilon) = max(H_eps(P || Q), H_eps(Q || P)),
    H_eps(P || Q) = sup_S P(S) - e^eps Q(S) = P(L > eps) - e^eps Q(L > eps),

where L(x) = log p(x)/q(x) is a quadratic in x, so {L > eps} is an interval, the complement
of one, or a half-line, and both probabilities are Gaussian masses of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import optimize, stats

# Far above any epsilon the estimate reports meaningfully: the profile is searched up to here.
_EPSILON_SEARCH_CEILING = 1e4


@dataclass(frozen=True)
class Gaussian:
    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (self.std > 0 and math.isfinite(self.std) and math.isfinite(self.mean)):
            raise ValueError(f"a Gaussian needs a finite mean and a positive finite std, not {self}")

    def mass(self, low: float, high: float) -> float:
        """P(low < X < high), from whichever tail keeps it accurate when it is tiny."""
        if low >= high:
            return 0.0
        if low >= self.mean:
            return float(stats.norm.sf(low, self.mean, self.std) - stats.norm.sf(high, self.mean, self.std))
        return float(stats.norm.cdf(high, self.mean, self.std) - stats.norm.cdf(low, self.mean, self.std))


def hockey_stick(p: Gaussian, q: Gaussian, epsilon: float) -> float:
    """H_eps(P || Q) = sup over events S of P(S) - e^eps Q(S)."""
    region = _loss_above(p, q, epsilon)
    weight = math.exp(epsilon)
    return max(0.0, sum(p.mass(low, high) - weight * q.mass(low, high) for low, high in region))


def delta_between(a: Gaussian, b: Gaussian, epsilon: float) -> float:
    """The smallest delta with which telling a from b is (epsilon, delta)-DP."""
    return max(hockey_stick(a, b, epsilon), hockey_stick(b, a, epsilon))


def epsilon_between(a: Gaussian, b: Gaussian, delta: float) -> float:
    """The smallest epsilon with which telling a from b is (epsilon, delta)-DP."""
    if delta_between(a, b, 0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_between(a, b, high) > delta:
        if high >= _EPSILON_SEARCH_CEILING:
            return math.inf
        high *= 10
    return float(optimize.brentq(lambda eps: delta_between(a, b, eps) - delta, high / 10 if high > 1 else 0.0, high))


def _loss_above(p: Gaussian, q: Gaussian, epsilon: float) -> list[tuple[float, float]]:
    """The intervals where log p(x)/q(x) > epsilon.

    log p/q = a x^2 + b x + c with a = (1/s_q^2 - 1/s_p^2) / 2, b = m_p/s_p^2 - m_q/s_q^2,
    c = (m_q^2/s_q^2 - m_p^2/s_p^2) / 2 + log(s_q/s_p).
    """
    a = (q.std**-2 - p.std**-2) / 2
    b = p.mean / p.std**2 - q.mean / q.std**2
    c = ((q.mean / q.std) ** 2 - (p.mean / p.std) ** 2) / 2 + math.log(q.std / p.std) - epsilon
    if a == 0:
        if b == 0:
            return [(-math.inf, math.inf)] if c > 0 else []
        root = -c / b
        return [(root, math.inf)] if b > 0 else [(-math.inf, root)]
    discriminant = b * b - 4 * a * c
    if discriminant <= 0:  # the quadratic keeps a's sign everywhere
        return [(-math.inf, math.inf)] if a > 0 else []
    # The stable form of the quadratic formula: no cancellation when a is tiny (near-equal stds).
    half = -(b + math.copysign(math.sqrt(discriminant), b)) / 2
    low, high = sorted((half / a, c / half))
    return [(-math.inf, low), (high, math.inf)] if a > 0 else [(low, high)]
