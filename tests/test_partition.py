"""Partitioners: every example lands at exactly one site, reproducibly by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig
from common.data.federation import federated_split, simulated_partitions, simulated_site_data, write_partitions
from common.data.partition import partition_indices
from common.errors import CohortInputError
from common.rundir import RunDirectory

LABELS = np.random.default_rng(0).integers(0, 10, size=1003)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_every_example_is_in_exactly_one_partition(partitioner: str) -> None:
    parts = partition_indices(LABELS, 7, DataConfig(partitioner=partitioner))
    combined = np.concatenate(parts)
    assert len(combined) == len(LABELS)
    assert sorted(combined.tolist()) == list(range(len(LABELS)))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_same_seed_gives_the_same_partitions(partitioner: str) -> None:
    first = partition_indices(LABELS, 5, DataConfig(partitioner=partitioner, seed=3))
    second = partition_indices(LABELS, 5, DataConfig(partitioner=partitioner, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_another_seed_gives_other_partitions(partitioner: str) -> None:
    first = partition_indices(LABELS, 5, DataConfig(partitioner=partitioner, seed=3))
    second = partition_indices(LABELS, 5, DataConfig(partitioner=partitioner, seed=4))
    assert not all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(first, second))


def test_small_dirichlet_alpha_skews_labels_more_than_iid() -> None:
    def mean_classes_per_site(config: DataConfig) -> float:
        parts = partition_indices(LABELS, 5, config)
        return float(np.mean([np.mean(np.bincount(LABELS[p], minlength=10) > 5) for p in parts]))

    assert mean_classes_per_site(DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1)) < mean_classes_per_site(DataConfig(partitioner="iid"))


def test_more_sites_than_examples_is_refused() -> None:
    with pytest.raises(CohortInputError, match="5 sites but only 3 training examples"):
        partition_indices(LABELS[:3], 5, DataConfig(partitioner="iid"))


def test_site_train_and_validation_splits_are_disjoint() -> None:
    site = simulated_site_data(DataConfig(), partition_id=1, num_partitions=5)
    train_rows = {row.tobytes() for row in site.train.images}
    assert len(site.val) >= 1
    assert not any(row.tobytes() in train_rows for row in site.val.images)


def test_a_simulation_partitions_once_and_its_sites_read_the_saved_shares(tmp_path: Path) -> None:
    config = DataConfig(partitioner="dirichlet", seed=7)
    write_partitions(config, 6, tmp_path)
    saved = np.load(RunDirectory(tmp_path).partitions_file)
    assert all(np.array_equal(saved[f"site-{i}"], part) for i, part in enumerate(partition_indices(federated_split(config).pool.labels, 6, config)))
    assert np.array_equal(simulated_site_data(config, 2, 6, str(tmp_path)).train.images, simulated_site_data(config, 2, 6).train.images)


def test_saved_partitions_of_other_data_settings_are_not_used(tmp_path: Path) -> None:
    write_partitions(DataConfig(partitioner="iid", seed=1), 4, tmp_path)
    other = DataConfig(partitioner="iid", seed=2)
    assert [len(p) for p in simulated_partitions(other, 4, str(tmp_path))] == [len(p) for p in simulated_partitions(other, 4)]
    assert not np.array_equal(simulated_partitions(other, 4, str(tmp_path))[0], simulated_partitions(DataConfig(partitioner="iid", seed=1), 4)[0])
