"""Partitioners: every example lands at exactly one site, reproducibly by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.site_data import simulated_site_data as site_reads
from client.site_data import simulated_site_file
from common.errors import CohortInputError
from server.held_out import federated_split
from server.run_config import DataConfig
from simulations.federation import simulated_partitions, simulated_site_data, write_site_files
from simulations.partition import partition_indices

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
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_another_seed_gives_other_partitions(partitioner: str) -> None:
    first = partition_indices(LABELS, 5, DataConfig(partitioner=partitioner, seed=3))
    second = partition_indices(LABELS, 5, DataConfig(partitioner=partitioner, seed=4))
    assert not all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(first, second, strict=True))


def test_small_dirichlet_alpha_skews_labels_more_than_iid() -> None:
    def mean_classes_per_site(config: DataConfig) -> float:
        parts = partition_indices(LABELS, 5, config)
        return float(np.mean([np.mean(np.bincount(LABELS[p], minlength=10) > 5) for p in parts]))

    assert mean_classes_per_site(DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1)) < mean_classes_per_site(
        DataConfig(partitioner="iid")
    )


def test_more_sites_than_examples_is_refused() -> None:
    with pytest.raises(CohortInputError, match="5 sites but only 3 training examples"):
        partition_indices(LABELS[:3], 5, DataConfig(partitioner="iid"))


def test_site_train_and_validation_splits_are_disjoint() -> None:
    site = simulated_site_data(DataConfig(), partition_id=1, num_partitions=5)
    train_rows = {row.tobytes() for row in site.train.images}
    assert len(site.val) >= 1
    assert not any(row.tobytes() in train_rows for row in site.val.images)


def test_a_simulation_partitions_once_and_each_site_reads_its_own_share(tmp_path: Path) -> None:
    config = DataConfig(partitioner="dirichlet", seed=7)
    write_site_files(config, 6, tmp_path)
    pool = federated_split(config).pool
    parts = partition_indices(pool.labels, 6, config)
    for site in (0, 2, 5):
        read = site_reads(str(tmp_path), site)
        assert np.array_equal(read.train.images, simulated_site_data(config, site, 6).train.images)
        assert len(read.train) + len(read.val) == len(parts[site])
        assert {row.tobytes() for row in pool.images[parts[site]]} == {
            row.tobytes() for row in np.concatenate([read.train.images, read.val.images])
        }


def test_each_sites_file_holds_that_sites_share_alone(tmp_path: Path) -> None:
    config = DataConfig(partitioner="iid", seed=1)
    write_site_files(config, 4, tmp_path)
    sizes = [len(part) for part in simulated_partitions(config, 4)]
    held = [np.load(simulated_site_file(tmp_path, site))["labels"].shape[0] for site in range(4)]
    assert held == sizes and sum(held) == len(federated_split(config).pool)
