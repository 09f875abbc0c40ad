"""Aggregation comes from Flower's own strategies, selected by name."""

from __future__ import annotations

import pytest
from flwr.serverapp import strategy as flower

from common.config import DPConfig
from common.errors import CohortInputError
from server.run_config import AggregationConfig, RunConfig
from server.strategies import AGGREGATION_WEIGHT, STRATEGIES, build_strategy, sample_size

EXPECTED = {
    "fedavg": flower.FedAvg,
    "fedprox": flower.FedProx,
    "fedadam": flower.FedAdam,
    "fedavgm": flower.FedAvgM,
    "fedmedian": flower.FedMedian,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
    "multikrum": flower.MultiKrum,
    "bulyan": flower.Bulyan,
    "qfedavg": flower.QFedAvg,
    "fedyogi": flower.FedYogi,
}


def test_every_configurable_strategy_has_a_flower_class() -> None:
    assert set(STRATEGIES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_strategy_name_selects_flowers_own_class(name: str) -> None:
    assert type(build_strategy(RunConfig(aggregation=AggregationConfig(strategy=name)), num_sites=5)) is EXPECTED[name]


def test_strategy_settings_reach_the_flower_strategy() -> None:
    fedprox = build_strategy(RunConfig(aggregation=AggregationConfig(strategy="fedprox", proximal_mu=0.3)), num_sites=5)
    krum = build_strategy(RunConfig(aggregation=AggregationConfig(strategy="krum", byzantine_sites=1)), num_sites=5)
    assert fedprox.proximal_mu == 0.3 and krum.num_malicious_nodes == 1


def test_qfedavg_reads_the_training_loss_with_the_runs_q() -> None:
    qfedavg = build_strategy(RunConfig(aggregation=AggregationConfig(strategy="qfedavg", qfedavg_q=0.5)), num_sites=5)
    assert (qfedavg.q, qfedavg.train_loss_key) == (0.5, "train-loss")


def test_minimum_sites_never_exceeds_the_sites_present() -> None:
    assert build_strategy(RunConfig(aggregation=AggregationConfig(min_sites=4)), num_sites=1).min_available_nodes == 1


@pytest.mark.parametrize("dp_level", ["sample", "client"])
def test_every_strategy_weighs_updates_by_the_servers_weight_not_the_sites_count(dp_level: str) -> None:
    assert build_strategy(RunConfig(dp=DPConfig(dp_level=dp_level)), num_sites=5).weighted_by_key == AGGREGATION_WEIGHT


def test_sample_size_is_what_flower_samples_each_round() -> None:
    assert sample_size(AggregationConfig(fraction_train=0.5, min_sites=2), num_sites=10) == 5
    assert sample_size(AggregationConfig(fraction_train=0.1, min_sites=2), num_sites=10) == 2


def test_an_aggregate_computed_in_float64_keeps_the_models_dtypes() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.federation import in_model_dtypes

    model = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)), "steps": Array(np.zeros(1, dtype=np.int64))})
    aggregated = ArrayRecord({"w": Array(np.full(3, 0.5)), "steps": Array(np.full(1, 2.0))})
    kept = in_model_dtypes(aggregated, model)
    assert kept["w"].numpy().dtype == np.float32 and kept["steps"].numpy().dtype == np.int64


def test_validation_samples_the_training_share_of_sites_unless_told_otherwise() -> None:
    by_default = build_strategy(RunConfig(aggregation=AggregationConfig(fraction_train=0.05)), num_sites=1000)
    set_apart = build_strategy(
        RunConfig(aggregation=AggregationConfig(fraction_train=0.05, fraction_evaluate=0.2)), num_sites=1000
    )
    assert (by_default.fraction_evaluate, set_apart.fraction_evaluate) == (0.05, 0.2)


def test_a_fraction_evaluate_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(CohortInputError, match=r"fraction-evaluate is 1\.5"):
        RunConfig.from_flower({"fraction-evaluate": 1.5})
