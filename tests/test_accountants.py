"""Accountants that check each other: Opacus RDP (enforced), Opacus PRV and dp-accounting PLD."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.cross_check import compare_accountants, dp_accounting_rdp_epsilon, opacus_rdp_epsilon
from common.privacy.accounting import PrivacyState

warnings.filterwarnings("ignore", category=UserWarning)


RANDOM_RELEASES = {
    "sigma": st.floats(min_value=0.6, max_value=5.0),
    "q": st.floats(min_value=0.01, max_value=1.0),
    "steps": st.integers(min_value=1, max_value=500),
    "delta": st.sampled_from([1e-4, 1e-5, 1e-6]),
}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(**RANDOM_RELEASES)
def test_opacus_rdp_matches_dp_accountings_rdp_within_one_percent(
    sigma: float, q: float, steps: int, delta: float
) -> None:
    """Same orders, two independent implementations of the subsampled Gaussian's RDP."""
    history = ((sigma, q, steps),)
    assert opacus_rdp_epsilon(history, delta) == pytest.approx(dp_accounting_rdp_epsilon(history, delta), rel=0.01)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(**RANDOM_RELEASES)
def test_recorded_epsilon_is_never_more_than_one_percent_above_dp_accountings_rdp(
    sigma: float, q: float, steps: int, delta: float
) -> None:
    """The recorded figure adds Opacus' fractional orders to the integer ones, so it is
    often tighter (by several percent where an order below 2 is optimal); the libraries'
    RDP-to-epsilon conversions differ slightly, so it may also sit a hair above."""
    recorded = PrivacyState(sigma, q, "rdp", ((sigma, q, steps),)).epsilon(delta)
    assert recorded <= dp_accounting_rdp_epsilon(((sigma, q, steps),), delta) * 1.01


@pytest.mark.parametrize("history", [((1.2, 0.2, 100),), ((2.6, 0.5, 50), (2.6, 0.5, 50)), ((0.9, 0.05, 400),)])
def test_tighter_accountants_agree_with_each_other_and_stay_below_rdp(history: tuple) -> None:
    comparison = compare_accountants(history, 1e-5)
    assert comparison.warnings == []
    assert comparison.pld <= comparison.rdp
    assert comparison.prv == pytest.approx(comparison.pld, rel=0.1)


def test_no_releases_mean_no_epsilon_under_any_accountant() -> None:
    assert compare_accountants((), 1e-5).rdp == 0.0
