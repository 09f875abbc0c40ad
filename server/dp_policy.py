"""The run's DP level as one small object the round loop asks at fixed points.

Sites protect their own data (sample-level DP-SGD, or no DP): the server aggregates what
passed the checks. Client-level DP: the server's noise is scaled for m equal shares, so it
releases a round only when all m sampled updates were accepted, ledgers each release,
and stops before a round that would exceed the run's budget.

Each level also sets the default bound on an update's norm (ChecksConfig.update_norm_bound
overrides it): see docs/benchmarks.md, "Why these norm bounds".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from logging import WARNING
from typing import Any, Protocol

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from common.config import RunConfig
from server.central_dp import CentralPrivacy, clipping_norm_of
from server.reply_checks import Update

# Clients clip in float32; a norm this close above the bound is rounding, not an attack.
_CLIPPED_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Release:
    """A round's aggregate (None: the global model stays) and what metrics.jsonl records of it."""

    arrays: ArrayRecord | None
    record: dict[str, Any] | None = None


class DPPolicy(Protocol):
    def stop_before(self, server_round: int) -> str | None: ...

    def norm_limit(self, norms: list[float]) -> float: ...

    def release(self, server_round: int, updates: list[Update]) -> Release: ...

    def stop_after(self, server_round: int, refused: list[str]) -> str | None: ...


@dataclass
class SiteProtected:
    """Sample-level DP at every site (or no DP): each site's ledger is its own report.

    Default norm bound: update_norm_factor x the round's (lower) median update norm. DP-SGD
    updates of honest sites have similar norms (the noise dominates and is the same at
    every site), so a boosted update stands out; the median is the honest sites' as long
    as fewer than half are hostile.
    """

    run: RunConfig
    strategy: Strategy

    def stop_before(self, server_round: int) -> str | None:
        return None

    def norm_limit(self, norms: list[float]) -> float:
        if self.run.checks.update_norm_bound > 0:
            return self.run.checks.update_norm_bound
        if not norms:
            return math.inf
        median = statistics.median_low(norms)
        return self.run.checks.update_norm_factor * median if median > 0 else math.inf

    def release(self, server_round: int, updates: list[Update]) -> Release:
        if not updates:
            return Release(None)
        arrays, _ = self.strategy.aggregate_train(server_round, [u.reply for u in updates])
        return Release(arrays)

    def stop_after(self, server_round: int, refused: list[str]) -> str | None:
        return None


@dataclass
class ClientLevel:
    """Client-level DP-FedAvg: the server's noise, budget and ledger.

    Default norm bound: the clipping norm when clients clip (a larger update broke the
    promise the noise relies on); none when the server clips, since it clips every
    update to that norm itself (rejecting would drop honest updates that adaptive
    clipping means to clip).
    """

    run: RunConfig
    strategy: Strategy
    central: CentralPrivacy

    def stop_before(self, server_round: int) -> str | None:
        return self.central.over_budget()

    def norm_limit(self, norms: list[float]) -> float:
        if self.run.checks.update_norm_bound > 0:
            return self.run.checks.update_norm_bound
        if self.run.dp.clipping_side == "client":
            return clipping_norm_of(self.strategy) * (1 + _CLIPPED_NORM_TOLERANCE)
        return math.inf

    def release(self, server_round: int, updates: list[Update]) -> Release:
        budget = self.run.dp.client_epsilon
        problem = self.central.incomplete(len(updates))
        if problem is not None:
            log(WARNING, "Round %d: no client-level release: %s", server_round, problem)
            return Release(None, {"released": False, "reason": problem, "epsilon": self.central.epsilon_after(), "budget": budget})
        clip_norm = clipping_norm_of(self.strategy)
        aggregated, _ = self.strategy.aggregate_train(server_round, [u.reply for u in updates])
        epsilon = self.central.record(server_round, aggregated, clip_norm)
        return Release(
            aggregated,
            {"released": True, "epsilon": epsilon, "delta": self.run.dp.client_delta, "budget": budget, "noise_multiplier": self.central.noise.accounted, "clip_norm": clip_norm},
        )

    def stop_after(self, server_round: int, refused: list[str]) -> str | None:
        if not refused:
            return None
        return (
            f"stopped after round {server_round}: client-level DP scales its noise for {self.central.sample_size} "
            f"sites per round, and {', '.join(sorted(refused))} refused to train"
        )
