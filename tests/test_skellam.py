"""The distributed Skellam mechanism: the RDP bound against the Renyi divergence computed
from the pmfs, the accounting built on it, and the site's secure integer sampler."""

from __future__ import annotations

import math
from functools import cache

import mpmath
import numpy as np
import pytest
from scipy import stats

from client.integer_noise import poisson, skellam
from common.privacy.accounting import derive_noise_multiplier
from common.privacy.noise import SecureNoise
from common.privacy.skellam import (
    ORDERS,
    SkellamRelease,
    epsilon,
    rdp_bound,
    rounded_sensitivity,
    tail_bound,
    variance_for_budget,
)

mpmath.mp.dps = 60


def skellam_pmf(variance: float, support: int) -> dict[int, mpmath.mpf]:
    """P(k) = e^-mu I_k(mu) for |k| <= support, exactly to 60 digits: Miller's backward
    recurrence I_(k-1) = I_(k+1) + (2k / mu) I_k from far beyond the support, normalised
    by e^-mu (I_0 + 2 sum I_k) = 1."""
    mu = mpmath.mpf(variance)
    top = support + 400 + int(10 * math.sqrt(variance))
    values = {top + 1: mpmath.mpf(0), top: mpmath.mpf("1e-300")}
    for k in range(top, 0, -1):
        values[k - 1] = values[k + 1] + 2 * k / mu * values[k]
    total = values[0] + 2 * mpmath.fsum(values[k] for k in range(1, top + 1))
    return {k: values[abs(k)] / total for k in range(-support, support + 1)}


@cache
def exact_renyi_divergence(order: int, shift: tuple[int, ...], variance: float) -> float:
    """D_alpha(P + shift || P) for P a product of Skellam(variance) coordinates: the sum of
    each coordinate's divergence, each summed over the pmf's support."""
    total = mpmath.mpf(0)
    for step in shift:
        support = int(variance + 40 * math.sqrt(variance) + 2 * order * abs(step) + 60)
        pmf = skellam_pmf(variance, support + abs(step))
        terms = mpmath.fsum(pmf[k - step] ** order * pmf[k] ** (1 - order) for k in range(-support, support + 1))
        total += mpmath.log(terms) / (order - 1)
    return float(total)


def test_recurrence_pmf_matches_the_bessel_function() -> None:
    pmf = skellam_pmf(30.0, 50)
    for k in (0, 7, 41):
        assert float(pmf[k]) == pytest.approx(float(mpmath.exp(-30) * mpmath.besseli(k, 30)), rel=1e-30)


CASES = [
    (2, (1,), 1.0),
    (3, (2,), 10.0),
    (4, (1, 1, 1, 1), 5.0),
    (8, (1,), 100.0),
    (16, (3, 4), 400.0),
    (32, (5,), 2000.0),
    (64, (2,), 3000.0),
    (6, (12, 16), 1600.0),
]


def bound_and_exact(order: int, shift: tuple[int, ...], variance: float) -> tuple[float, float]:
    l2, l1 = math.sqrt(sum(s * s for s in shift)), float(sum(abs(s) for s in shift))
    return float(rdp_bound(np.array([order], dtype=float), variance, l2, l1)[0]), exact_renyi_divergence(
        order, shift, variance
    )


@pytest.mark.parametrize(("order", "shift", "variance"), CASES)
def test_rdp_bound_is_at_least_the_exact_renyi_divergence(order: int, shift: tuple[int, ...], variance: float) -> None:
    bound, exact = bound_and_exact(order, shift, variance)
    assert exact <= bound


@pytest.mark.parametrize(("order", "shift", "variance"), [case for case in CASES if case[2] >= 100])
def test_rdp_bound_is_within_two_percent_of_the_divergence_once_the_noise_exceeds_the_shift(
    order: int, shift: tuple[int, ...], variance: float
) -> None:
    bound, exact = bound_and_exact(order, shift, variance)
    assert bound <= 1.02 * exact


def test_rdp_bound_is_the_gaussians_once_the_variance_dwarfs_the_sensitivity() -> None:
    l2, l1 = rounded_sensitivity(clip_norm=1.0, scale=1e4, dimension=1000)
    sigma = 1.5
    bound = rdp_bound(ORDERS, (sigma * l2) ** 2, l2, l1)
    assert bound == pytest.approx(ORDERS / (2 * sigma**2), rel=1e-6)


def test_epsilon_matches_opacus_gaussian_accounting_at_large_scale() -> None:
    l2, l1 = rounded_sensitivity(clip_norm=1.0, scale=1e5, dimension=500)
    sigma = derive_noise_multiplier(8.0, 1e-5, 1.0, 20, "rdp")
    skellam_epsilon = epsilon([SkellamRelease((sigma * l2) ** 2, l2, l1)] * 20, 1e-5)
    assert skellam_epsilon == pytest.approx(8.0, rel=0.02)


def test_releases_compose_and_only_the_noise_added_counts() -> None:
    release = SkellamRelease(variance=4e6, l2_sensitivity=1000.0, l1_sensitivity=2e4)
    fewer_sites = SkellamRelease(variance=3e6, l2_sensitivity=1000.0, l1_sensitivity=2e4)
    assert epsilon([release] * 2, 1e-5) > epsilon([release], 1e-5)
    assert epsilon([fewer_sites], 1e-5) > epsilon([release], 1e-5)
    assert release.noise_multiplier == pytest.approx(2.0)


def test_variance_for_budget_keeps_the_runs_releases_within_epsilon() -> None:
    l2, l1 = rounded_sensitivity(clip_norm=1.0, scale=80_000.0, dimension=6186)
    variance = variance_for_budget(4.0, 1e-5, 12, l2, l1)
    spent = epsilon([SkellamRelease(variance, l2, l1)] * 12, 1e-5)
    assert 0.99 * 4.0 <= spent <= 4.0


def test_rounding_adds_at_most_sqrt_d_to_the_l2_sensitivity() -> None:
    l2, l1 = rounded_sensitivity(clip_norm=2.0, scale=10.0, dimension=100)
    assert (l2, l1) == (30.0, 300.0)


def test_tail_bound_holds_for_the_skellam_distribution() -> None:
    for variance in (3.0, 50.0, 1e4):
        t = tail_bound(variance, coordinates=100, probability=1e-6)
        exceed = 2 * stats.skellam.sf(t, variance / 2, variance / 2) * 100
        assert exceed <= 1e-6
        assert 2 * stats.skellam.sf(t / 2, variance / 2, variance / 2) * 100 > 1e-6, (
            "the bound should not be loose by 2x"
        )


@pytest.mark.parametrize("mean", [0.4, 6.0, 12.0, 75.0, 2500.0])
def test_poisson_sampler_matches_the_pmf(mean: float) -> None:
    draws = poisson(mean, 100_000, SecureNoise())
    values, counts = np.unique(draws, return_counts=True)
    expected = stats.poisson.pmf(values, mean) * draws.size
    kept = expected > 5
    assert stats.chisquare(counts[kept], expected[kept] * counts[kept].sum() / expected[kept].sum()).pvalue > 1e-4


def test_skellam_sampler_matches_the_pmf() -> None:
    draws = skellam(40.0, 100_000, SecureNoise())
    values, counts = np.unique(draws, return_counts=True)
    expected = stats.skellam.pmf(values, 20.0, 20.0) * draws.size
    kept = expected > 5
    assert stats.chisquare(counts[kept], expected[kept] * counts[kept].sum() / expected[kept].sum()).pvalue > 1e-4


def test_skellam_sampler_keeps_its_variance_at_the_means_sites_draw() -> None:
    variance = 2.5e10
    draws = skellam(variance, 50_000, SecureNoise())
    assert abs(draws.mean()) < 5 * math.sqrt(variance / draws.size)
    assert draws.var() == pytest.approx(variance, rel=0.03)


def test_two_sources_never_draw_the_same_noise() -> None:
    first, second = skellam(1e6, 1000, SecureNoise()), skellam(1e6, 1000, SecureNoise())
    assert not np.array_equal(first, second)
