"""Accountants that check each other: Opacus RDP (enforced), Opacus PRV and dp-accounting PLD."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.privacy.accounting import PrivacyState
from common.privacy.cross_check import compare_accountants, dp_accounting_rdp_epsilon

warnings.filterwarnings("ignore", category=UserWarning)


@settings(max_examples=40, deadline=None)
@given(
    sigma=st.floats(min_value=0.6, max_value=5.0),
    q=st.floats(min_value=0.01, max_value=1.0),
    steps=st.integers(min_value=1, max_value=500),
    delta=st.sampled_from([1e-4, 1e-5, 1e-6]),
)
def test_recorded_epsilon_matches_dp_accountings_rdp_within_one_percent(sigma: float, q: float, steps: int, delta: float) -> None:
    """Over the budgets sites set (epsilon <= 10); above that the libraries' different
    RDP-to-epsilon conversions drift apart by more than 1%."""
    recorded = PrivacyState(sigma, q, "rdp", ((sigma, q, steps),)).epsilon(delta)
    assume(recorded <= 10)
    assert recorded == pytest.approx(dp_accounting_rdp_epsilon(((sigma, q, steps),), delta), rel=0.01)


@pytest.mark.parametrize("history", [((1.2, 0.2, 100),), ((2.6, 0.5, 50), (2.6, 0.5, 50)), ((0.9, 0.05, 400),)])
def test_tighter_accountants_agree_with_each_other_and_stay_below_rdp(history: tuple) -> None:
    comparison = compare_accountants(history, 1e-5)
    assert comparison.warnings == []
    assert comparison.pld <= comparison.rdp
    assert comparison.prv == pytest.approx(comparison.pld, rel=0.1)


def test_no_releases_mean_no_epsilon_under_any_accountant() -> None:
    assert compare_accountants((), 1e-5).rdp == 0.0
