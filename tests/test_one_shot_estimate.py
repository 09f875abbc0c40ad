"""The one-shot estimate of client-level privacy (Andrew et al., ICLR 2024): the epsilon
between two Gaussians, the canary clients' directions, and the settings it refuses. The
estimate on real runs is tested in test_client_level_dp.py (a Flower simulation of
client-level.toml) and test_audit_catches_bugs.py (an injected bug)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy import integrate, stats
from typer.testing import CliRunner

from audit.two_gaussians import Gaussian, delta_between, epsilon_between, hockey_stick
from cli.main import app
from common.errors import CohortInputError
from server.canary_clients import canary_direction
from server.run_config import RunConfig
from simulations.plan import plan_from_values

PAIRS = [
    (Gaussian(0.0, 1.0), Gaussian(1.0, 1.0)),
    (Gaussian(0.0, 1.0), Gaussian(0.8, 1.2)),
    (Gaussian(0.0, 1.0), Gaussian(2.0, 0.5)),
    (Gaussian(0.0, 6186**-0.5), Gaussian(0.01, 0.011)),  # cosines in the cnn's dimension
]


def _integrated(p: Gaussian, q: Gaussian, epsilon: float) -> float:
    """H_eps(P || Q) = integral of max(0, p(x) - e^eps q(x)), by quadrature."""
    low = min(p.mean - 12 * p.std, q.mean - 12 * q.std)
    high = max(p.mean + 12 * p.std, q.mean + 12 * q.std)
    weight = math.exp(epsilon)

    def excess(x: float) -> float:
        return max(0.0, stats.norm.pdf(x, p.mean, p.std) - weight * stats.norm.pdf(x, q.mean, q.std))

    return float(integrate.quad(excess, low, high, limit=200, points=np.linspace(low, high, 30))[0])


@pytest.mark.parametrize(("p", "q"), PAIRS)
@pytest.mark.parametrize("epsilon", [0.0, 2.0])
def test_the_hockey_stick_divergence_of_two_gaussians_matches_numerical_integration(
    p: Gaussian, q: Gaussian, epsilon: float
) -> None:
    assert hockey_stick(p, q, epsilon) == pytest.approx(_integrated(p, q, epsilon), rel=1e-6, abs=1e-10)
    assert hockey_stick(q, p, epsilon) == pytest.approx(_integrated(q, p, epsilon), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_equal_spreads_give_the_gaussian_mechanisms_epsilon_as_dp_accounting_computes_it(shift: float) -> None:
    expected = privacy_loss_distribution.from_gaussian_mechanism(
        1 / shift, sensitivity=1.0, value_discretization_interval=1e-4
    ).get_epsilon_for_delta(1e-5)
    assert epsilon_between(Gaussian(0.0, 1.0), Gaussian(shift, 1.0), 1e-5) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("p", "q"), PAIRS)
def test_the_epsilon_found_gives_exactly_the_delta_asked_for(p: Gaussian, q: Gaussian) -> None:
    epsilon = epsilon_between(p, q, 1e-5)
    assert epsilon > 0
    assert delta_between(p, q, epsilon) == pytest.approx(1e-5, rel=1e-6)


def test_a_spread_unlike_the_nulls_raises_epsilon_at_the_same_mean() -> None:
    """Why the estimate runs high with few canaries: a fitted spread off by 10% either way adds to epsilon."""
    null, same = Gaussian(0.0, 1.0), epsilon_between(Gaussian(0.0, 1.0), Gaussian(1.0, 1.0), 1e-5)
    assert epsilon_between(null, Gaussian(1.0, 0.9), 1e-5) > same + 1
    assert epsilon_between(null, Gaussian(1.0, 1.1), 1e-5) > same + 1


def test_canary_directions_are_unit_vectors_redrawn_alike_from_the_seed() -> None:
    first = canary_direction(42, 3, 6186)
    assert np.linalg.norm(first) == pytest.approx(1.0)
    assert np.array_equal(first, canary_direction(42, 3, 6186))
    others = [canary_direction(42, 4, 6186), canary_direction(7, 3, 6186)]
    assert all(abs(first @ other) < 5 / math.sqrt(6186) for other in others)


def test_cosines_of_directions_never_inserted_spread_as_the_null() -> None:
    """The null the final-model estimate assumes: N(0, 1/d) for a unit direction and any fixed vector."""
    fixed = np.random.default_rng(0).standard_normal(6186)
    cosines = np.array([canary_direction(1, i, 6186) @ fixed for i in range(2000)]) / np.linalg.norm(fixed)
    assert abs(cosines.mean()) < 3 / math.sqrt(2000 * 6186)
    assert cosines.std() * math.sqrt(6186) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("settings", [{}, {"dp": False}], ids=["sample level", "no DP"])
def test_canary_clients_are_refused_without_client_level_dp(settings: dict[str, object]) -> None:
    with pytest.raises(CohortInputError, match='dp-level = "client"'):
        RunConfig.from_flower({**settings, "audit-canary-clients": 100})


def test_too_few_canary_clients_to_fit_a_gaussian_are_refused() -> None:
    with pytest.raises(CohortInputError, match="at least 10"):
        RunConfig.from_flower({"dp-level": "client", "audit-canary-clients": 5})


def test_canary_clients_are_refused_under_secure_aggregation() -> None:
    settings = {"dp-level": "client", "secure-aggregation": True, "clipping-side": "client"}
    with pytest.raises(CohortInputError, match="secure-aggregation = false"):
        RunConfig.from_flower({**settings, "audit-canary-clients": 100})


def test_canary_clients_and_an_attack_are_refused_together() -> None:
    settings = {"dp-level": "client", "audit-canary-clients": 20, "attack": "boost", "attack-sites": [1]}
    with pytest.raises(CohortInputError, match="audit-canary-clients"):
        plan_from_values(settings)


def test_a_deployed_run_refuses_canary_clients() -> None:
    result = CliRunner().invoke(app, ["run", "nowhere", "--set", "dp-level=client", "--set", "audit-canary-clients=50"])
    assert result.exit_code == 2
    assert "only a simulation may do" in " ".join(result.stderr.split())
