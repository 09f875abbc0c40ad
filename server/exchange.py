"""One send-and-receive with the sites, bounded in time.

`grid.send_and_receive` without a timeout waits for every reply up to the message lifetime
(12 hours); every exchange here has one. What did not come back in time, and every error
reply, becomes part of the round's report: a site that refuses to train is out of the run,
one that declines to evaluate is within its policy, anything else is the site's failure.
A node is named only by the registry (registered, or bound in this run), never by what an
error reply says. Every instruction carries the newest ledger entry the coordinator
accepted from its site (common.protocol.SITE_NEWEST_ENTRY).
The replies that carry content come back for their stage's checks (server.reply_checks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol
from server.records import Failure, RoundReport, Stage
from server.reply_checks import one_line
from server.site_registry import SiteRegistry

# Without a configured reply-timeout: the first exchange of a stage may take this long
# (sites load data and build models; Ray starts its workers), later ones a multiple of the
# slowest complete one so far, never less than the floor.
FIRST_EXCHANGE_TIMEOUT_S = 600.0
TIMEOUT_FACTOR = 4.0
TIMEOUT_FLOOR_S = 60.0


@dataclass
class ReplyTimeout:
    """The timeout of each exchange: the run config's, or sized from the exchanges so far."""

    configured: float
    slowest: dict[str, float] = field(default_factory=dict)

    def seconds(self, stage: str) -> float:
        if self.configured > 0:
            return self.configured
        if stage not in self.slowest:
            return FIRST_EXCHANGE_TIMEOUT_S
        return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * self.slowest[stage])

    def observe(self, stage: str, seconds: float) -> None:
        self.slowest[stage] = max(seconds, self.slowest.get(stage, 0.0))


@dataclass
class Exchange:
    """The run's exchanges with its sites. `stage` names one kind of exchange (a stage of
    the round, or a step of a multi-step protocol) and sizes its timeout from its own past."""

    grid: Grid
    timeout: ReplyTimeout
    registry: SiteRegistry

    def send(self, messages: list[Message], stage: str, report: RoundReport) -> list[tuple[int, Message]]:
        """Send and wait at most the stage's timeout. Returns each reply that carries content
        with the node it answers for: the node the message was sent to. That is not always
        its sender: the SuperLink itself answers, with an error, for a node that stopped
        sending heartbeats (a killed SuperNode). Silent nodes and error replies go into
        `report`."""
        if not messages:
            return []
        for message in messages:
            self._add_newest_entry(message)
        seconds = self.timeout.seconds(stage)
        started = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=seconds))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # the grid set the ids on sending
        answers = [(sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
        silent = sorted({m.metadata.dst_node_id for m in messages} - {node for node, _ in answers})
        if silent:
            for node in silent:
                report.fail(Failure(node, self.registry.known_as(node), stage, f"no reply within {seconds:.0f}s"))
            log(
                WARNING,
                "Round %d: no %s reply within %.0fs from node(s) %s",
                report.server_round,
                stage,
                seconds,
                silent,
            )
        else:
            self.timeout.observe(stage, time.monotonic() - started)
        for node, reply in answers:
            if reply.has_error():
                self._error_reply(node, reply, stage, report)
        return [(node, reply) for node, reply in answers if not reply.has_error()]

    def _add_newest_entry(self, message: Message) -> None:
        """Each site gets back the newest entry the coordinator accepted from it (kept across
        runs), with every instruction that carries the run's config. The strategies give
        all of a round's messages one content: each gets its own copy."""
        entry = self.registry.newest_entry_for(message.metadata.dst_node_id)
        config = message.content.config_records.get(protocol.CONFIG)
        if not entry or config is None:
            return
        content = RecordDict(dict(message.content))
        content[protocol.CONFIG] = ConfigRecord({**config, protocol.SITE_NEWEST_ENTRY: entry})
        message.content = content

    def _error_reply(self, node: int, reply: Message, stage: str, report: RoundReport) -> None:
        reason = one_line(reply.error.reason or "")
        if (
            stage != Stage.EVALUATE and reply.error.code == protocol.SITE_REFUSED
        ):  # the study's ask or a training stage, secure aggregation's included
            report.refusals[node] = self.registry.known_as(node)  # never a name from its prose
            report.refusal_reasons[report.refusals[node]] = reason
            log(WARNING, "Round %d: %s; it is out of this run", report.server_round, reason)
            return
        if stage == Stage.EVALUATE and reply.error.code == protocol.SITE_DECLINED_EVALUATION:
            # The site's policy, not a failure; a policy does not change within a run.
            report.declined_evaluation.add(node)
            log(INFO, "Round %d: %s; it is not asked to evaluate again in this run", report.server_round, reason)
            return
        report.fail(Failure(node, self.registry.known_as(node), stage, reason))
        log(WARNING, "Round %d: node %d failed to %s: %s", report.server_round, node, stage, reason)
