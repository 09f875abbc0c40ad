"""The one-run audit's statistical test (Steinke, Nasr and Jagielski, NeurIPS 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.one_run import Guesses, epsilon_lower_bound, p_value, randomized_response_accuracy, require_power
from common.errors import CohortInputError

# (m, r, v, delta) -> the bound at 95% confidence, as computed by the independent
# implementation in DeepMind's jax-privacy 2.0.0 (jax_privacy.auditing._epsilon_one_run).
REFERENCE_BOUNDS = [
    ((1000, 100, 100, 1e-5), 3.465376),
    ((1000, 200, 190, 1e-5), 2.393618),
    ((1000, 1000, 900, 1e-5), 2.020646),
    ((100, 20, 20, 1e-5), 1.819597),
    ((1000, 200, 150, 1e-5), 0.819973),
    ((5000, 1000, 700, 1e-6), 0.731876),
    ((200, 40, 36, 1e-5), 1.296691),
    ((1000, 100, 90, 0.0), 1.630823),
]


@pytest.mark.parametrize(("case", "expected"), REFERENCE_BOUNDS)
def test_bound_matches_an_independent_implementation(case: tuple[int, int, int, float], expected: float) -> None:
    m, r, v, delta = case
    assert epsilon_lower_bound(Guesses(m, r, v), delta) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("r", [20, 100, 1000])
def test_all_right_guesses_without_delta_give_the_closed_form_bound(r: int) -> None:
    """With delta = 0 and v = r, the p-value is q^r: the bound solves q^r = 0.05."""
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(Guesses(r, r, r), 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_chance_level_guessing_certifies_nothing() -> None:
    assert epsilon_lower_bound(Guesses(1000, 200, 100), 1e-5) == 0.0


def test_more_right_guesses_never_lower_the_bound() -> None:
    bounds = [epsilon_lower_bound(Guesses(1000, 200, v), 1e-5) for v in range(100, 201, 10)]
    assert bounds == sorted(bounds)


def test_delta_only_weakens_the_bound() -> None:
    guesses = Guesses(1000, 200, 180)
    assert epsilon_lower_bound(guesses, 1e-3) < epsilon_lower_bound(guesses, 1e-5) < epsilon_lower_bound(guesses, 0.0)


def test_p_value_at_the_bound_is_the_significance_level() -> None:
    guesses = Guesses(1000, 200, 180)
    assert p_value(guesses, epsilon_lower_bound(guesses, 1e-5), 1e-5) == pytest.approx(0.05, abs=1e-6)


def test_on_epsilon_dp_randomized_response_the_bound_is_valid_and_has_power() -> None:
    """The mechanism the test is built on: each canary's bit, reported truthfully with
    probability e^eps/(1+e^eps). At 95% confidence the bound may exceed the true epsilon
    in at most ~5% of trials, and with m = 2000 it must come close to it."""
    epsilon, m, trials = 2.0, 2000, 200
    rng = np.random.default_rng(7)
    truthful = rng.random((trials, m)) < randomized_response_accuracy(epsilon)
    bounds = [epsilon_lower_bound(Guesses(m, m, int(row.sum())), 0.0) for row in truthful]
    assert np.mean(np.array(bounds) > epsilon) <= 0.08
    assert np.median(bounds) > 0.85 * epsilon


def test_too_few_canaries_for_any_bound_are_refused() -> None:
    with pytest.raises(CohortInputError, match="cannot show any leakage"):
        require_power(canaries=8, guesses=4, delta=1e-5)


def test_guesses_must_fit_the_canaries() -> None:
    with pytest.raises(CohortInputError, match="correct"):
        Guesses(canaries=10, guesses=20, correct=5)
