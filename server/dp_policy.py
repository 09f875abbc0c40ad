"""The run's DP level as one small object the round loop asks at fixed points.

Sites protect their own data (sample-level DP-SGD, or no DP): the server aggregates what
passed the checks. Client-level DP: the server's noise is scaled for m equal shares, so it
releases a round only when all m sampled updates were accepted, ledgers each release,
and stops before a round that would exceed the run's budget. Distributed client-level DP
(under secure aggregation): the sites' noise is already in the sum the server unmasks;
the server accounts for it, ledgers each release and keeps the budget.

Each level also sets the default bound on an update's norm (ChecksConfig.update_norm_bound
overrides it): see docs/benchmarks.md, "Why these norm bounds".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from logging import WARNING
from typing import Protocol

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from server.central_dp import CentralPrivacy, clipping_norm_of
from server.collect import Contributions
from server.distributed_dp import DistributedPrivacy
from server.records import CentralRelease
from server.run_config import RunConfig
from server.secure_collect import SummedUpdates

# Clients clip in float32; a norm this close above the bound is rounding, not an attack.
_CLIPPED_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Release:
    """A round's aggregate (None: the global model stays), and the server's own release
    under client-level DP, as metrics.jsonl records it (None at the other levels)."""

    arrays: ArrayRecord | None
    record: CentralRelease | None = None


class DPPolicy(Protocol):
    """What a run's DP level decides, asked by the round loop (server.federation) at fixed
    points of every round, in this order: `stop_before`; `norm_limit`, by the collect stage
    (server.collect) while it gathers the round's contributions; `release`, when enough
    sites contributed; `stop_after`, once the round is recorded and checkpointed.
    """

    def stop_before(self, server_round: int) -> str | None:
        """Whether the run must stop before a round.

        Called at the start of every round, before any message is sent.

        Parameters
        ----------
        server_round : int
            The round about to start, from 1 (a resumed run starts after its checkpoint's).

        Returns
        -------
        str | None
            Why the run stops (one line: it becomes the run's stop reason), or None to go on.
        """
        ...

    def norm_limit(self, norms: list[float]) -> float:
        """The largest L2 norm of (update - global model) accepted this round.

        Called by a collect stage that sees each site's update, once per round, after every
        reply passed its own checks and before any update is handed on.

        Parameters
        ----------
        norms : list[float]
            The norm of every checked update of the round, all finite; possibly empty.

        Returns
        -------
        float
            The bound: an update above it is rejected (math.inf for none).
        """
        ...

    def release(self, server_round: int, contributions: Contributions) -> Release:
        """Aggregate the round's contributions, as far as the DP level lets it.

        Called once per round, after the collect stage, when at least min-sites sites
        contributed (otherwise the round ends with the global model kept, and the run stops
        after it).

        Parameters
        ----------
        server_round : int
            The current round, from 1.
        contributions : Contributions
            What counts this round: checked, within the norm bound, weighed by the server.
            The policy may assume `contributions.count >= 1` and that the replies carry the
            global model's array names, shapes and dtypes, all finite.

        Returns
        -------
        Release
            The new global model (arrays None keeps the old one) and, at client level, the
            server's release as metrics.jsonl records it.
        """
        ...

    def stop_after(self, server_round: int, refused: list[str]) -> str | None:
        """Whether the run must stop after a round that was released.

        Called once the round is recorded and checkpointed, for a round with a release.

        Parameters
        ----------
        server_round : int
            The round just recorded.
        refused : list[str]
            The sites that refused to train in this round (out of the run from now on).

        Returns
        -------
        str | None
            Why the run stops (it becomes the run's stop reason), or None to go on.
        """
        ...


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

    def release(self, server_round: int, contributions: Contributions) -> Release:
        arrays, _ = self.strategy.aggregate_train(server_round, contributions.replies())
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
        if self.run.central_dp.clipping_side == "client":
            return clipping_norm_of(self.strategy) * (1 + _CLIPPED_NORM_TOLERANCE)
        return math.inf

    def release(self, server_round: int, contributions: Contributions) -> Release:
        problem = self.central.incomplete(contributions.count)
        if problem is not None:
            return self._withheld(server_round, problem)
        clip_norm = clipping_norm_of(self.strategy)
        aggregated, _ = self.strategy.aggregate_train(server_round, contributions.replies())
        if aggregated is None:  # Flower's strategy found nothing it could aggregate
            return self._withheld(server_round, "the strategy aggregated no update")
        epsilon = self.central.record(server_round, aggregated, clip_norm)
        return Release(
            aggregated,
            CentralRelease(
                released=True,
                epsilon=epsilon,
                delta=self.run.central_dp.client_delta,
                budget=self.run.central_dp.client_epsilon,
                noise_multiplier=self.central.noise.accounted,
                clip_norm=clip_norm,
            ),
        )

    def _withheld(self, server_round: int, problem: str) -> Release:
        """No release this round, and why: nothing is spent."""
        log(WARNING, "Round %d: no client-level release: %s", server_round, problem)
        return Release(
            None,
            CentralRelease(
                released=False,
                reason=problem,
                epsilon=self.central.epsilon_after(),
                budget=self.run.central_dp.client_epsilon,
            ),
        )

    def stop_after(self, server_round: int, refused: list[str]) -> str | None:
        if not refused:
            return None
        return (
            f"stopped after round {server_round}: client-level DP scales its noise for {self.central.sample_size} "
            f"sites per round, and {', '.join(sorted(refused))} refused to train"
        )


@dataclass
class DistributedClientLevel:
    """Client-level DP whose noise the sites add (SecAgg+ with Skellam noise): the server's
    accounting, budget and ledger, for sums it receives from server.secure_collect.

    No norm bound: the collect stage never sees an update; each site clips its own, and the
    sum is checked against the bound their clipping implies before it is unmasked.
    """

    run: RunConfig
    strategy: Strategy
    privacy: DistributedPrivacy

    def stop_before(self, server_round: int) -> str | None:
        return self.privacy.over_budget()

    def norm_limit(self, norms: list[float]) -> float:
        return math.inf

    def release(self, server_round: int, contributions: Contributions) -> Release:
        assert isinstance(contributions, SummedUpdates), "distributed DP releases only securely aggregated sums"
        aggregated, _ = self.strategy.aggregate_train(server_round, contributions.replies())
        assert aggregated is not None
        spent, release = self.privacy.record(
            server_round, aggregated, contributions.noise_variance, contributions.sites
        )
        central = self.run.central_dp
        return Release(
            aggregated,
            CentralRelease(
                released=True,
                epsilon=spent,
                delta=central.client_delta,
                budget=central.client_epsilon,
                noise_multiplier=release.noise_multiplier,
                clip_norm=self.run.dp.clip_norm,
            ),
        )

    def stop_after(self, server_round: int, refused: list[str]) -> str | None:
        return None
