"""Who holds which data in a simulation: each simulated site's share of the pool, its
split and, at the canary site, the audit's canaries; and the canary clients' blank images.

Partitioning derives every site's share together, so a site that partitioned to find its
own would pay for every site of the federation (seconds with a thousand). A simulation
therefore partitions once, in the process that starts it, and writes each site's data to
its own file in the run directory (write_site_files); a site worker reads only its own
(client.site_data), which also spares it flwr-datasets and the simulation's code.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from client.site_data import SimulatedHolding, SiteData, simulated_site_file
from client.site_data import simulated_site_data as read_site_data
from common.data.dataset import LabeledImages
from common.errors import CohortInputError
from common.private_files import open_private, private_dir
from server.canaries import GradientCanaries
from server.held_out import federated_split
from server.run_config import DataConfig
from simulations.partition import partition_indices


@lru_cache(maxsize=4)
def simulated_partitions(config: DataConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Every site's pool indices, once per process."""
    return tuple(partition_indices(federated_split(config).pool.labels, num_partitions, config))


def site_holding(
    config: DataConfig, partition_id: int, num_partitions: int, gradient: GradientCanaries | None = None
) -> SimulatedHolding:
    """What simulated site `partition_id` holds: its share, split by the run's seed and
    validation share, the run's seed for its seeded noise, and the canaries it trains on
    (input canaries, or the coordinates of `gradient` canaries) when it is the audit's
    canary site."""
    if not 0 <= partition_id < num_partitions:
        raise CohortInputError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    split = federated_split(config)
    share = split.pool.subset(simulated_partitions(config, num_partitions)[partition_id])
    canary_site = partition_id == config.audit_canary_site
    canaries = split.canaries.trained_on if split.canaries is not None and canary_site else None
    return SimulatedHolding(
        share,
        split.num_classes,
        config.val_fraction,
        config.seed + partition_id,
        config.seed,
        canaries,
        gradient.trained_on if gradient is not None and canary_site else None,
    )


def canary_client_holding(config: DataConfig) -> SimulatedHolding:
    """What a canary client (server.canary_clients) holds: two blank images, one to train on
    and one to validate on, so that it answers a round as any client does. What it trains
    is thrown away (its update is its direction), and it holds nothing of anyone's."""
    split = federated_split(config)
    blank = LabeledImages(np.zeros((2, *split.input_shape), dtype=np.float32), np.arange(2, dtype=np.int64))
    return SimulatedHolding(blank, split.num_classes, config.val_fraction, config.seed, config.seed)


def write_site_files(
    config: DataConfig, num_partitions: int, run_dir: Path, gradient: GradientCanaries | None = None
) -> None:
    """Each simulated site's data in its own file, then each canary client's (partition
    ids num_partitions onwards). Plain writes: the files are derived from the run's config,
    written before any site starts, and written again when a run is resumed, so a crash
    mid-write costs nothing."""
    private_dir(simulated_site_file(run_dir, 0).parent)
    holdings = [site_holding(config, partition_id, num_partitions, gradient) for partition_id in range(num_partitions)]
    holdings += [canary_client_holding(config)] * config.audit_canary_clients
    for partition_id, holding in enumerate(holdings):
        with open_private(simulated_site_file(run_dir, partition_id), "wb") as stream:
            stream.write(holding.to_bytes())


def simulated_site_data(config: DataConfig, partition_id: int, num_partitions: int, run_dir: str = "") -> SiteData:
    """A simulated site's data in the simulation's own process: read from the file the run
    wrote for it, as the site read it, or derived here when there is none (a run directory
    from before the sites' files, or no run at all)."""
    if run_dir and simulated_site_file(Path(run_dir), partition_id).is_file():
        return read_site_data(run_dir, partition_id)
    return site_holding(config, partition_id, num_partitions).site_data()
