"""What a site decides for itself, read from its node config.

Only the site may decide how its data is used: its data path, its total privacy budget
and delta, and where it keeps its state. The coordinator's run config cannot override
any of these. In simulation, where Flower gives each simulated node only a partition id,
the run config's site-epsilon/site-delta act as the default policy of every simulated
site; a node config that sets `epsilon` or `delta` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from common.config import RunConfig, validate_budget
from common.errors import CohortInputError


@dataclass(frozen=True)
class SiteConfig:
    """One site's own settings.

    name: how the site is named in metrics, ledgers and checkpoints.
    epsilon: the site's total privacy budget for this dataset.
    delta: the delta of the site's (epsilon, delta) guarantee.
    data_path: the site's own data (deployment); None means a simulated partition.
    partition_id, num_partitions: which simulated partition this site holds.
    state_dir: where the site keeps state that outlives a run ('' for none).
    """

    name: str
    epsilon: float
    delta: float
    data_path: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    state_dir: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        partition_id = node_config.get("partition-id")
        num_partitions = node_config.get("num-partitions")
        data_path = node_config.get("data-path")
        if data_path is None and partition_id is None:
            raise CohortInputError(
                "the node config names no data: set data-path=PATH in --node-config"
            )
        default_name = f"site-{partition_id}" if partition_id is not None else "site"
        epsilon = float(node_config.get("epsilon", run.site_epsilon))
        delta = float(node_config.get("delta", run.site_delta))
        validate_budget(epsilon, delta, source="the site's node config")
        return cls(
            name=str(node_config.get("site-name", default_name)),
            epsilon=epsilon,
            delta=delta,
            data_path=str(data_path) if data_path is not None else None,
            partition_id=int(partition_id) if partition_id is not None else None,
            num_partitions=int(num_partitions) if num_partitions is not None else None,
            state_dir=str(node_config.get("state-dir", "")),
        )
