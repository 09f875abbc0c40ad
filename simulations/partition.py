"""Split a training pool across simulated sites with flwr-datasets' partitioners.

The partitioners run on an in-memory Hugging Face dataset of (index, label) rows, so no
data is downloaded; each partition comes back as the indices it holds.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

from common.errors import CohortInputError
from server.run_config import DataConfig

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def partition_indices(labels: np.ndarray, num_partitions: int, config: DataConfig) -> list[np.ndarray]:
    """Deterministic in config.seed; every index lands in exactly one partition."""
    if num_partitions < 1:
        raise CohortInputError(f"the federation has {num_partitions} sites; it needs at least 1")
    if num_partitions > len(labels):
        raise CohortInputError(
            f"{num_partitions} sites but only {len(labels)} training examples; use fewer sites or more data"
        )
    from datasets import Dataset

    # Shuffled first: IidPartitioner takes contiguous shards and has no seed of its own.
    rows = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels}).shuffle(seed=config.seed)
    partitioner = _build_partitioner(len(labels), num_partitions, config)
    partitioner.dataset = rows
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)]
    except ValueError as error:
        raise CohortInputError(
            f"cannot split {len(labels)} examples into {num_partitions} '{config.partitioner}' partitions "
            f"({error}); use fewer sites, a larger dirichlet-alpha or the iid partitioner"
        ) from None
    return parts


def _build_partitioner(num_examples: int, num_partitions: int, config: DataConfig) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if config.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if config.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=config.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=False,
            shuffle=True,
            seed=config.seed,
        )
    # Shards sized to round up, and the last one kept short: with num_shards_per_partition
    # instead, flwr-datasets drops the remainder of N / (sites * shards) examples.
    return ShardPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        shard_size=math.ceil(num_examples / (num_partitions * config.shards_per_site)),
        keep_incomplete_shard=True,
        shuffle=True,
        seed=config.seed,
    )
