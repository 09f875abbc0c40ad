"""The one-run privacy audit of Steinke, Nasr and Jagielski (NeurIPS 2023), as a test.

m canaries are each put into a site's training data with probability 1/2. The auditor
scores every canary after training and guesses "in" for the r+ highest scores and "out"
for the r- lowest, abstaining on the rest. If the run is (epsilon, delta)-DP towards
each example, the number of correct guesses among the r = r+ + r- made is stochastically
dominated by Binomial(r, e^eps / (1 + e^eps)), up to a delta term (the paper's
Theorem 5.2). Observing v correct guesses therefore rejects "the run is eps-DP" at
confidence 1 - beta whenever that tail probability is below beta; the largest such eps
is an empirical lower bound on the privacy loss. It is a lower bound only: a weak attack
finds little, so a DP run can show far less than its accountant's epsilon, and a run
without DP must show clear leakage for the audit to mean anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from common.errors import CohortInputError

CONFIDENCE = 0.95
# Far above any epsilon a canary count can certify: with m <= 10^6 guesses all correct,
# the bound stays below log(2m / beta) ~ 18.
_EPSILON_SEARCH_CEILING = 100.0


@dataclass(frozen=True)
class Guesses:
    """What the auditor did: m canaries, r guesses made, v of them correct."""

    canaries: int
    guesses: int
    correct: int

    def __post_init__(self) -> None:
        if not 0 <= self.correct <= self.guesses <= self.canaries:
            raise CohortInputError(
                f"need 0 <= correct ({self.correct}) <= guesses ({self.guesses}) <= canaries ({self.canaries})"
            )


def p_value(guesses: Guesses, epsilon: float, delta: float) -> float:
    """Probability of v or more correct guesses if the run were (epsilon, delta)-DP.

    The first term is the binomial tail of epsilon-DP randomised response; the second is
    the paper's delta correction, 2 m delta max_i P[v - i <= Binomial(r, q) < v] / i.
    """
    r, v = guesses.guesses, guesses.correct
    q = special.expit(epsilon)
    tail = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return float(min(1.0, tail))
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return float(min(1.0, tail + 2 * guesses.canaries * delta * worst))


def epsilon_lower_bound(guesses: Guesses, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon that v correct guesses reject at this confidence (0 if none)."""
    beta = 1 - confidence
    if p_value(guesses, 0.0, delta) >= beta:
        return 0.0
    return float(
        optimize.brentq(lambda eps: p_value(guesses, eps, delta) - beta, 0.0, _EPSILON_SEARCH_CEILING, xtol=1e-6)
    )


def require_power(canaries: int, guesses: int, delta: float, confidence: float = CONFIDENCE) -> None:
    """Refuse an audit that could certify nothing even if every guess were right."""
    if guesses < 1 or epsilon_lower_bound(Guesses(canaries, guesses, guesses), delta, confidence) == 0.0:
        raise CohortInputError(
            f"{canaries} canaries with {guesses} guesses cannot show any leakage at {confidence:.0%} confidence, even "
            "if every guess were right; use more canaries (audit-canaries, 100 or more) or more guesses (--guesses)"
        )


def randomized_response_accuracy(epsilon: float) -> float:
    """How often an epsilon-DP randomised response tells the truth: e^eps / (1 + e^eps)."""
    return 1 / (1 + math.exp(-epsilon))
