"""The collect stage of a round: "get this round's contributions", between the global model
and the DP policy (server.dp_policy).

A collect stage asks the sites for their contributions, checks what comes back, and hands
the DP policy what counts. The round loop (server.federation) knows only this interface, so
how contributions are gathered can change without touching it or the policy:

- PlainCollect, today's: one training exchange, every reply in the clear and checked on its
  own (server.reply_checks), the policy's norm bound applied to each update, the accepted
  updates weighed by the server and handed on one by one, in site order (SiteUpdates).
- a secure-aggregation protocol, later: as many exchanges as it needs (keys, masked
  updates, unmasking), dropouts and failures reported into the round's report as they
  happen, the sites' verified ledger entries accepted without their updates, and only the
  sum handed on (a Contributions whose replies() is the one aggregate). Only strategies
  whose registry entry says secure_aggregation can aggregate that (require_compatible).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.errors import CohortInputError
from server.aggregation_weight import rewrite_for_aggregation
from server.audit_transcript import AuditTranscript
from server.exchange import Exchange
from server.records import Rejection, RoundReport, Stage
from server.reply_checks import ReplyChecker, Update
from server.run_config import RunConfig
from server.strategies import STRATEGIES, StrategySpec


class Contributions(Protocol):
    """A round's accepted contributions, as the DP policy receives them."""

    @property
    def count(self) -> int:
        """How many sites contributed: the m that client-level DP's noise is scaled for."""
        ...

    def replies(self) -> list[Message]:
        """What the strategy's `aggregate_train` receives: one message per accepted site
        (arrays and the server's weight), or one message carrying the weighted aggregate
        when the stage saw nothing else."""
        ...


@dataclass(frozen=True)
class SiteUpdates:
    """Each accepted site's update, checked and weighed (PlainCollect's contributions)."""

    updates: list[Update]

    @property
    def count(self) -> int:
        return len(self.updates)

    def replies(self) -> list[Message]:
        return [update.reply for update in self.updates]


class CollectStage(Protocol):
    """Gets one round's contributions from the sites, in front of the DP policy.

    sum_only: whether the stage hands on only the sum of the updates (secure aggregation),
        so that only strategies whose registry entry says secure_aggregation can use it.
    """

    sum_only: ClassVar[bool]

    def collect(self, server_round: int, arrays: ArrayRecord, excluded: set[int], report: RoundReport) -> Contributions:
        """Ask the sites to train on the global model, and gather what counts.

        Called once per round by the round loop, after the DP policy's `stop_before` let the
        round start and before `release`; never twice for one round.

        Parameters
        ----------
        server_round : int
            The round, starting from 1 (a resumed run starts after its checkpoint's).
        arrays : ArrayRecord
            The global model the sites train from, in the model's own dtypes; every update
            is checked against its names, shapes and dtypes.
        excluded : set[int]
            Node ids that refused earlier in the run: send them nothing.
        report : RoundReport
            The round's report. The stage records in it each site's figures and verified
            ledger entry (`accept`), each rejected reply (`reject`), each failure
            (`fail`, a silent node or an error reply), and each refusal, as they happen:
            `Exchange.send` does so for silence and error replies.

        Returns
        -------
        Contributions
            What counts this round: possibly none. The stage may assume nothing about the
            sites: every reply is untrusted input until its checks pass.
        """
        ...

    def too_few(self, sites: int) -> str | None:
        """Why no round can be collected when only `sites` sites can still train (the
        others refused the study or a round), before any is asked; None when one can."""
        ...


@dataclass
class PlainCollect:
    """Every sampled site's reply in the clear: one exchange, each reply checked, the DP
    policy's norm bound applied to each update, the rest weighed by the server.

    norm_limit: the DP policy's bound for the round's norms (DPPolicy.norm_limit).
    transcript: where a simulation keeps its canary site's every update for the empirical
        audit (None: it keeps none).
    """

    sum_only: ClassVar[bool] = False

    run: RunConfig
    strategy: Strategy
    exchange: Exchange
    checker: ReplyChecker
    norm_limit: Callable[[list[float]], float]
    transcript: AuditTranscript | None = None

    def too_few(self, sites: int) -> str | None:
        return None  # min-sites alone decides

    def collect(self, server_round: int, arrays: ArrayRecord, excluded: set[int], report: RoundReport) -> SiteUpdates:
        sampled = self.strategy.configure_train(server_round, arrays, train_config(self.run), self.exchange.grid)
        replies = self.exchange.send(
            [m for m in sampled if m.metadata.dst_node_id not in excluded], Stage.TRAIN, report
        )
        live = set(self.exchange.grid.get_node_ids())
        updates: list[Update] = []
        for _, reply in replies:
            checked = self.checker.check_train(server_round, reply, arrays, live)
            if isinstance(checked, Rejection):
                report.reject(checked)
            else:
                updates.append(checked)
                if self.transcript is not None:
                    self.transcript.keep(server_round, checked.site, arrays, checked.arrays)
        updates.sort(
            key=lambda update: update.site
        )  # replies arrive in any order; the float sums of aggregation must not depend on it
        limit = self.norm_limit([u.norm for u in updates])
        for update in [u for u in updates if u.norm > limit]:
            report.reject(
                Rejection(
                    update.node,
                    update.site,
                    Stage.TRAIN,
                    f"sent an update of norm {update.norm:.4g}, above the bound {limit:.4g}",
                    update.entry,
                )
            )
        updates = [u for u in updates if u.norm <= limit]
        for update in updates:
            report.accept(update.site, update.site_record(), update.entry)
        rewrite_for_aggregation(updates, self.run)
        return SiteUpdates(updates)


def train_config(run: RunConfig) -> ConfigRecord:
    """What each training message tells a site besides the model."""
    config = ConfigRecord()
    if STRATEGIES[run.aggregation.strategy].proximal:
        config[protocol.CONFIG_PROXIMAL_MU] = run.aggregation.proximal_mu
    return config


def require_compatible(stage: CollectStage, strategy: StrategySpec) -> None:
    """Refuse a strategy that needs more than the stage hands on."""
    if stage.sum_only and not strategy.secure_aggregation:
        secure = ", ".join(name for name, spec in STRATEGIES.items() if spec.secure_aggregation)
        raise CohortInputError(
            f"strategy {strategy.title} needs each site's update, which secure aggregation hides; use one of {secure}"
        )
