"""The ask before round 1: every site says whether it takes part in the study, and at
what epsilon, before any site reads its data.

Each site decides from its own policy and ledger (client/study_grant.py) and answers with
its grant, or refuses with a one-line reason; a refusal puts it out of the run as a
refusal in a round does. What this tells the coordinator is what a site's replies already
carry when its policy sends the accounting metrics: the grant is at most what the site has
left and its per-study cap, so a refusal says the site has less left than the study asked
(docs/site.md).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol
from server.exchange import Exchange
from server.records import RoundReport, Stage


def ask_sites(grid: Grid, exchange: Exchange, report: RoundReport) -> dict[str, float]:
    """Each site's grant to the study, by the name it answers with; refusals go into `report`."""
    ask = RecordDict({protocol.CONFIG: ConfigRecord({protocol.CONFIG_ROUND: 0})})
    messages = [Message(ask, dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    grants: dict[str, float] = {}
    for node, reply in exchange.send(messages, Stage.ASK, report):
        site = reply.content.config_records.get(protocol.SITE)
        metrics = reply.content.metric_records.get(protocol.METRICS)
        name = str(site[protocol.SITE_NAME]) if site is not None and protocol.SITE_NAME in site else f"node {node}"
        granted = metrics.get(protocol.STUDY_EPSILON) if metrics is not None else None
        if isinstance(granted, int | float):
            grants[name] = float(granted)
    for name, epsilon in sorted(grants.items()):
        log(INFO, "Study: %s grants epsilon %.3f", name, epsilon)
    return grants
