"""Aggregation comes from Flower's own strategies, selected by name."""

from __future__ import annotations

import pytest
from flwr.serverapp import strategy as flower

from common.config import STRATEGIES, TrainingConfig
from server.strategies import build_strategy

EXPECTED = {
    "fedavg": flower.FedAvg,
    "fedprox": flower.FedProx,
    "fedadam": flower.FedAdam,
    "fedavgm": flower.FedAvgM,
    "fedmedian": flower.FedMedian,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
}


def test_every_configurable_strategy_has_a_flower_class() -> None:
    assert set(STRATEGIES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_strategy_name_selects_flowers_own_class(name: str) -> None:
    assert type(build_strategy(TrainingConfig(strategy=name), num_sites=5)) is EXPECTED[name]


def test_strategy_settings_reach_the_flower_strategy() -> None:
    fedprox = build_strategy(TrainingConfig(strategy="fedprox", proximal_mu=0.3), num_sites=5)
    krum = build_strategy(TrainingConfig(strategy="krum", krum_byzantine=1), num_sites=5)
    assert fedprox.proximal_mu == 0.3 and krum.num_malicious_nodes == 1


def test_minimum_sites_never_exceeds_the_sites_present() -> None:
    assert build_strategy(TrainingConfig(min_sites=4), num_sites=1).min_available_nodes == 1
