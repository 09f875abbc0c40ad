"""The collect stage of secure aggregation: each round's training exchange becomes the four
exchanges of SecAgg+ (server.secure_aggregation), every one under the run's reply timeout,
and the DP policy receives the sites' sum, never an update.

What the coordinator still checks: each site's identity and its signed ledger entry, which
binds the masked input the site sent (the update itself is hidden, so its hash cannot be
checked); the form of every protocol message; and, once unmasked, that the sum is finite
and within the bound the sites' clipping implies. A site whose entry does not verify
counts as a site that dropped after sharing: its neighbours' masks against it are removed
and its input is left out of the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING
from typing import ClassVar

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.secure_aggregation.messages import Stage
from common.secure_aggregation.model_vector import plus_vector
from common.secure_aggregation.parameters import SecAggParameters
from server.collect import train_config
from server.exchange import Exchange
from server.records import Rejection, RoundReport
from server.reply_checks import MaskedContribution, ReplyChecker
from server.run_config import RunConfig
from server.secure_aggregation import Abandoned, SecureAggregationRound
from server.strategies import AGGREGATION_WEIGHT


@dataclass(frozen=True)
class SummedUpdates:
    """A securely aggregated round, as the DP policy receives it.

    count: the sites whose inputs the sum holds.
    aggregate: the global model plus their mean update (the mean of their clipped updates
        and of their Skellam noise), as one reply of weight 1 for the strategy (None when
        the round was abandoned).
    noise_variance: the Skellam variance per coordinate the sum carries, in its integer
        units (0 without distributed DP).
    sites: the contributing sites' names.
    """

    count: int
    aggregate: Message | None = None
    noise_variance: float = 0.0
    sites: tuple[str, ...] = ()

    def replies(self) -> list[Message]:
        return [self.aggregate] if self.aggregate is not None else []


@dataclass
class SecureCollect:
    """Secure aggregation of every sampled site's update, in equal shares."""

    sum_only: ClassVar[bool] = True

    run: RunConfig
    strategy: Strategy
    exchange: Exchange
    checker: ReplyChecker
    parameters: SecAggParameters
    run_id: int

    def too_few(self, sites: int) -> str | None:
        """The run's parameters are sized before round 1 for every sampled site, before the
        study's ask: a round with fewer sites than they unmask a sum with would be
        abandoned at its first stage, each round alike."""
        needed = max(self.parameters.min_contributions, self.parameters.threshold)
        if sites >= needed:
            return None
        return (
            f"{sites} site(s) can still train, fewer than the {needed} a securely aggregated round of this run is "
            f"unmasked with (sized for {self.parameters.sites} sites; lower secure-aggregation-dropout or ask the "
            "sites for less epsilon)"
        )

    def collect(self, server_round: int, arrays: ArrayRecord, excluded: set[int], report: RoundReport) -> SummedUpdates:
        sampled = [
            m
            for m in self.strategy.configure_train(server_round, arrays, train_config(self.run), self.exchange.grid)
            if m.metadata.dst_node_id not in excluded
        ]
        if not sampled:
            return SummedUpdates(0)
        live = set(self.exchange.grid.get_node_ids())
        accepted: dict[int, MaskedContribution] = {}
        spent: dict[int, Rejection] = {}

        def accept(node: int, reply: Message) -> str | None:
            checked = self.checker.check_masked(server_round, node, reply, live)
            if isinstance(checked, Rejection):
                spent[node] = checked
                return checked.reason
            accepted[node] = checked
            return None

        protocol_round = SecureAggregationRound(
            self.parameters, self.run_id, server_round, [m.metadata.dst_node_id for m in sampled]
        )
        result = protocol_round.run(
            lambda messages, stage: self.exchange.send(messages, stage, report), sampled[0].content, accept
        )
        for dropout in protocol_round.dropouts:
            if dropout.violation:
                report.reject(
                    spent.get(dropout.node)
                    or Rejection(dropout.node, self._name(dropout.node), dropout.stage, dropout.reason)
                )
        if isinstance(result, Abandoned):
            log(
                WARNING,
                "Round %d: secure aggregation abandoned at the %s stage: %s",
                server_round,
                result.stage,
                result.reason,
            )
            for contribution in accepted.values():  # they spent it; it counts for nothing
                report.reject(
                    Rejection(
                        contribution.node,
                        contribution.site,
                        Stage.MASKED_INPUT,
                        f"its input is lost: the round was abandoned: {result.reason}",
                        contribution.entry,
                    )
                )
            return SummedUpdates(0)
        contributors = [accepted[node] for node in result.contributors]
        for contribution in contributors:
            report.accept(contribution.site, contribution.site_record(), contribution.entry)
        log(INFO, "Round %d: unmasked the sum of %d sites' updates", server_round, len(contributors))
        mean = plus_vector(arrays, result.total / len(contributors))
        aggregate = Message(
            RecordDict({protocol.ARRAYS: mean, protocol.METRICS: MetricRecord({AGGREGATION_WEIGHT: 1.0})}),
            reply_to=sampled[0],
        )
        return SummedUpdates(
            len(contributors), aggregate, result.noise_variance, tuple(sorted(c.site for c in contributors))
        )

    def _name(self, node: int) -> str:
        return self.exchange.registry.known_as(node)
