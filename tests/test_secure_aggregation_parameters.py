"""A round's secure aggregation parameters are checked before any key is drawn, and a
site's update becomes the integers it masks as the parameters say."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app as cli
from client.integer_update import clipped, integer_update
from common.errors import CohortInputError
from common.privacy.noise import SecureNoise
from common.privacy.skellam import SkellamRelease, epsilon
from common.secure_aggregation.parameters import SecAggParameters, default_neighbours, default_threshold
from server.run_config import RunConfig
from server.secure_aggregation_plan import DistributedNoise, plan_parameters

VALID = SecAggParameters(
    sites=10, neighbours=9, threshold=6, bits=32, clip_norm=1.0, dimension=6186, noise_variance=0.0, min_contributions=8
)


def test_the_defaults_pass_for_every_federation_size() -> None:
    for sites in (2, 3, 5, 10, 17, 100, 1000):
        k = default_neighbours(sites)
        dataclasses.replace(
            VALID, sites=sites, neighbours=k, threshold=default_threshold(k), min_contributions=2
        ).validate()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"threshold": 5}, "secure-aggregation-threshold is 5"),
        ({"threshold": 11}, "secure-aggregation-threshold is 11"),
        ({"neighbours": 5}, "secure-aggregation-neighbours is 5"),
        ({"neighbours": 10}, "secure-aggregation-neighbours is 10"),
        ({"sites": 1, "neighbours": 0, "threshold": 1, "min_contributions": 1}, "at least 2 sites"),
        ({"min_contributions": 11}, "unmasked with 2 to 10"),
        ({"bits": 64}, "secure-aggregation-bits is 64"),
        ({"clip_norm": 0.0}, "clip norm"),
        ({"noise_variance": -1.0}, "noise variance"),
    ],
)
def test_a_parameter_that_cannot_work_is_refused_with_its_name(change: dict, named: str) -> None:
    with pytest.raises(CohortInputError, match=named):
        dataclasses.replace(VALID, **change).validate()


def test_too_few_bits_for_the_sum_are_refused_naming_the_bits_it_needs() -> None:
    params = dataclasses.replace(VALID, bits=16)
    needed = params.bits_needed()
    with pytest.raises(CohortInputError, match=f"at least {needed}"):
        params.validate()
    dataclasses.replace(params, bits=needed).validate()


def test_at_the_bits_the_check_asks_for_every_site_at_its_bound_plus_noise_fits_the_signed_range() -> None:
    params = dataclasses.replace(VALID, noise_variance=1e9)
    params = dataclasses.replace(params, bits=params.bits_needed())
    assert (
        params.sites * (params.scale * params.clip_norm + 1)
        < params.coordinate_bound(params.sites)
        < 2 ** (params.bits - 1)
    )


def test_noise_needs_more_bits_than_no_noise() -> None:
    assert dataclasses.replace(VALID, noise_variance=1e12).bits_needed() > VALID.bits_needed()


def test_parameters_survive_the_record_and_a_wrong_type_is_refused() -> None:
    record = VALID.to_record()
    assert SecAggParameters.from_record(record) == VALID
    with pytest.raises(CohortInputError, match="threshold"):
        SecAggParameters.from_record({**record, "secagg-threshold": "6"})


def test_clipping_bounds_the_update_norm_and_leaves_short_updates_alone() -> None:
    long, short = np.full(100, 1.0), np.full(100, 0.01)
    assert np.linalg.norm(clipped(long, 1.0)) <= 1.0
    assert np.array_equal(clipped(short, 1.0), short)


def test_integer_update_is_the_scaled_update_rounded_by_less_than_one() -> None:
    params = dataclasses.replace(VALID, dimension=500)
    update = np.random.default_rng(0).normal(0, 0.02, 500)
    integers = integer_update(update, params, SecureNoise())
    assert integers.dtype == np.int64
    assert np.abs(integers - clipped(update, 1.0) * params.scale).max() < 1


def test_stochastic_rounding_is_unbiased() -> None:
    params = dataclasses.replace(VALID, dimension=1, clip_norm=1.0)
    value = 0.3 / params.scale  # 0.3 of one integer step
    draws = np.array([integer_update(np.array([value]), params, SecureNoise())[0] for _ in range(4000)])
    assert set(draws) == {0, 1}
    assert draws.mean() == pytest.approx(0.3, abs=0.03)


def test_the_plan_sizes_each_sites_noise_so_the_fewest_allowed_contributions_keep_the_budget() -> None:
    noise = DistributedNoise(epsilon=8.0, delta=1e-5, rounds=10)
    params = plan_parameters(sites=100, dimension=6186, clip_norm=1.0, bits=32, dropout=0.2, noise=noise)
    assert params.min_contributions == 80
    l2, l1 = params.sensitivity
    at_fewest = SkellamRelease(params.min_contributions * params.noise_variance, l2, l1)
    assert 0.99 * 8.0 <= epsilon([at_fewest] * 10, 1e-5) <= 8.0
    with_all = SkellamRelease(params.sites * params.noise_variance, l2, l1)
    assert epsilon([with_all] * 10, 1e-5) < 8.0


def test_the_plan_refuses_a_dropout_share_outside_zero_to_one() -> None:
    with pytest.raises(CohortInputError, match=r"secure-aggregation-dropout is 1\.0"):
        plan_parameters(sites=10, dimension=100, clip_norm=1.0, bits=32, dropout=1.0)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"strategy": "krum"}, "strategy Krum needs each site's update"),
        ({"strategy": "qfedavg"}, "strategy q-FedAvg needs each site's update"),
        ({"aggregation-weight": "examples"}, 'aggregation-weight = "uniform"'),
        ({"update-norm-bound": 2.0}, "set update-norm-bound = 0"),
        ({"dp-level": "client"}, 'set clipping-side = "client"'),
        (
            {"dp-level": "client", "clipping-side": "client", "client-clipping": "adaptive"},
            'set client-clipping = "fixed"',
        ),
        ({"secure-aggregation-dropout": 1.0}, "secure-aggregation-dropout is 1.0"),
    ],
)
def test_settings_that_need_each_update_are_refused_with_the_setting_to_change(settings: dict, named: str) -> None:
    with pytest.raises(CohortInputError, match=re.escape(named)):
        RunConfig.from_flower({"secure-aggregation": True, **settings})


def test_simulate_refuses_too_few_bits_before_anything_starts(tmp_path) -> None:
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        cli,
        [
            "simulate",
            "--set",
            "secure-aggregation=true",
            "--set",
            "secure-aggregation-bits=16",
            "--runs-dir",
            str(runs),
        ],
    )
    assert result.exit_code == 2 and not runs.exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "raise secure-aggregation-bits to at least" in result.stderr
