"""What a site decides for itself: its data, its privacy budget and its state directory.

Only the site may decide how its data is used; the coordinator's run config cannot
override any of this. The policy is read, first match wins, from:
1. the site's node config (`--node-config "epsilon=3 delta=1e-6 ..."`),
2. `policy.toml` in the site's state directory (what an operator leaves on the site's disk),
3. in simulation only, where Flower gives each simulated node just a partition id: the run
   config's site-epsilon / site-delta / site-allow-non-private, as the default policy of
   every simulated site. A deployed site (one with a data-path) must set its own budget:
   the coordinator's run config never decides it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.config import RunConfig, validate_budget
from common.errors import CohortInputError

POLICY_FILE = "policy.toml"


@dataclass(frozen=True)
class SiteConfig:
    """One site's own settings.

    name: how the site is named in metrics, ledgers and checkpoints.
    epsilon: the site's total privacy budget for its dataset, over every run.
    delta: the delta of the site's (epsilon, delta) guarantee.
    run_epsilon: an optional cap on what any single run may spend (None for no cap).
    allow_non_private: whether the site trains at all when a run asks for no DP; off
        unless the site's policy turns it on, since such training has no guarantee.
    state_dir: where the site keeps its ledger and signing key; it outlives runs.
    data_path: the site's own data (deployment); None means a simulated partition.
    partition_id, num_partitions: which simulated partition this site holds.
    """

    name: str
    epsilon: float
    delta: float
    state_dir: Path
    run_epsilon: float | None = None
    allow_non_private: bool = False
    data_path: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        partition_id = node_config.get("partition-id")
        num_partitions = node_config.get("num-partitions")
        data_path = node_config.get("data-path")
        if data_path is None and partition_id is None:
            raise CohortInputError("the node config names no data: set data-path=PATH in --node-config")
        name = str(node_config.get("site-name", f"site-{partition_id}" if partition_id is not None else "site"))
        state_dir = Path(str(node_config.get("state-dir", Path(run.federation_home) / name))).expanduser().resolve()
        policy = {**_read_policy(state_dir / POLICY_FILE), **node_config}
        if data_path is not None:
            missing = [key for key in ("epsilon", "delta") if key not in policy]
            if missing:
                raise CohortInputError(
                    f"site {name} sets no {' or '.join(missing)}: a deployed site chooses its own privacy budget; "
                    f"add it to --node-config (e.g. \"epsilon=8 delta=1e-5\") or to {state_dir / POLICY_FILE}"
                )
        epsilon = _number(policy.get("epsilon", run.site_epsilon), "epsilon")
        delta = _number(policy.get("delta", run.site_delta), "delta")
        validate_budget(epsilon, delta, source=f"site {name}'s policy")
        run_epsilon = policy.get("run-epsilon")
        if run_epsilon is not None and _number(run_epsilon, "run-epsilon") <= 0:
            raise CohortInputError(f"run-epsilon is {run_epsilon} in site {name}'s policy; a per-run cap must be > 0")
        return cls(
            name=name,
            epsilon=epsilon,
            delta=delta,
            state_dir=state_dir,
            run_epsilon=_number(run_epsilon, "run-epsilon") if run_epsilon is not None else None,
            allow_non_private=_flag(policy.get("allow-non-private", run.site_allow_non_private), "allow-non-private"),
            data_path=str(data_path) if data_path is not None else None,
            partition_id=int(partition_id) if partition_id is not None else None,
            num_partitions=int(num_partitions) if num_partitions is not None else None,
        )


def _read_policy(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as error:
        raise CohortInputError(f"{path} is not valid TOML ({error}); fix the site's policy file") from None


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise CohortInputError(f"{name} is {value!r} in the site's policy; use true or false")


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CohortInputError(f"{name} is {value!r} in the site's policy; it must be a number") from None
