"""Privacy accounting: epsilon composes over rounds and a derived sigma meets its target."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.registry import _ACCOUNTANTS

from common.config import ACCOUNTANTS
from common.errors import CohortInputError
from common.privacy.accounting import (
    PrivacyState,
    composing_accountants,
    derive_noise_multiplier,
    merged_history,
    restore_accountant,
)

DELTA = 1e-5


@pytest.mark.parametrize("rounds", [1, 3, 10])
def test_epsilon_over_rounds_of_restored_history_equals_one_continuous_accountant(rounds: int) -> None:
    sigma, q, steps_per_round = 1.1, 0.2, 10
    continuous = RDPAccountant()
    state = PrivacyState(noise_multiplier=sigma, sample_rate=q, accountant="rdp")
    for _ in range(rounds):
        round_accountant = restore_accountant(state)
        for _ in range(steps_per_round):
            round_accountant.step(noise_multiplier=sigma, sample_rate=q)
            continuous.step(noise_multiplier=sigma, sample_rate=q)
        state = state.after(round_accountant)
    assert state.steps == rounds * steps_per_round
    assert state.epsilon(DELTA) == pytest.approx(continuous.get_epsilon(DELTA), rel=1e-12)


def test_a_fresh_accountant_every_round_would_undercount() -> None:
    """The mistake Cohort avoids: restarting the accountant each round forgets earlier rounds."""
    one_round = PrivacyState(1.1, 0.2, "rdp", ((1.1, 0.2, 10),))
    three_rounds = PrivacyState(1.1, 0.2, "rdp", ((1.1, 0.2, 30),))
    assert three_rounds.epsilon(DELTA) > one_round.epsilon(DELTA) * 1.3


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("sample_rate,steps", [(0.2, 100), (0.05, 600), (0.5, 40)])
def test_derived_sigma_keeps_epsilon_within_target_after_the_planned_steps(
    target: float, sample_rate: float, steps: int
) -> None:
    sigma = derive_noise_multiplier(target, DELTA, sample_rate, steps, "rdp")
    state = PrivacyState(sigma, sample_rate, "rdp", ((sigma, sample_rate, steps),))
    assert state.epsilon(DELTA) <= target
    assert state.epsilon(DELTA) > target * 0.95  # and it is not wastefully noisy


def test_no_history_means_no_privacy_spent() -> None:
    assert PrivacyState(1.0, 0.1, "rdp").epsilon(DELTA) == 0.0


def test_a_budget_no_noise_can_meet_is_refused_clearly() -> None:
    with pytest.raises(CohortInputError, match="raise the site's epsilon or train fewer rounds"):
        derive_noise_multiplier(1e-9, DELTA, 1.0, 10_000, "rdp")


def test_merging_rounds_of_the_same_mechanism_changes_no_epsilon() -> None:
    from common.privacy.accounting import merged_history

    rounds = (*((1.3, 0.25, 4) for _ in range(12)), (0.9, 0.1, 7))
    assert merged_history(rounds) == ((1.3, 0.25, 48), (0.9, 0.1, 7))
    separate = RDPAccountant()
    separate.history = list(rounds)
    assert PrivacyState(1.3, 0.25, "rdp", rounds).epsilon(DELTA) == pytest.approx(
        separate.get_epsilon(DELTA), rel=1e-12
    )


def test_gdp_is_left_out_of_a_history_of_several_noise_levels_while_another_accountant_bounds_it() -> None:
    assert composing_accountants(("gdp", "rdp"), 1) == ("gdp", "rdp")
    assert composing_accountants(("gdp", "rdp"), 2) == ("rdp",)


def test_gdp_alone_is_kept_so_that_its_refusal_names_the_problem() -> None:
    assert composing_accountants(("gdp",), 2) == ("gdp",)
    with pytest.raises(CohortInputError, match="gdp accountant composes one noise multiplier"):
        PrivacyState(1.0, 0.01, "gdp", ((1.0, 0.01, 10), (2.0, 0.01, 10))).epsilon(1e-5)


def test_gdp_epsilon_beyond_opacus_solver_range_is_infinite() -> None:
    assert PrivacyState(0.3, 0.5, "gdp", ((0.3, 0.5, 1000),)).epsilon(1e-5) == float("inf")


def test_the_accountants_a_setting_may_name_are_opacus_own() -> None:
    assert sorted(ACCOUNTANTS) == sorted(_ACCOUNTANTS)


@pytest.mark.parametrize(
    "history",
    [
        ((1.1, 0.01, 400),),
        ((0.7, 0.4, 9), (2.5, 0.4, 3), (0.7, 0.4, 6)),
        ((4.0, 0.9, 2), (0.55, 0.05, 1000), (1.3, 0.2, 17)),
    ],
)
def test_rdp_epsilon_is_exactly_what_opacus_rdp_accountant_gives(history: tuple) -> None:
    accountant = RDPAccountant()
    accountant.history = list(merged_history(history))
    assert PrivacyState(1.0, 1.0, "rdp", history).epsilon(1e-5) == accountant.get_epsilon(delta=1e-5)
