"""A federation in one process: Cohort's ServerApp (`server.app`) sends its messages to a
grid whose every message is answered at once by the site's own ClientApp (`client.app`:
its data, training and ledger), as Flower would deliver them, but without Flower's
transport (no SuperLink, no Ray, no processes). For tests that need the whole round loop
but not a real federation, and for measuring what the messages carry.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto

from client.app import app as client_app
from common.secure_aggregation.messages import RECORD
from server.app import main as server_main
from server.held_out import gradient_canaries
from server.run_config import RunConfig
from server.run_outcome import RunStopped
from simulations.canary_clients import app as canary_client_app
from simulations.federation import write_site_files

# Flower's node ids are large random integers; these are too.
FIRST_NODE = 4_000_000_000_000_000_000


@dataclass
class InProcessGrid:
    """A Flower grid whose every message is answered at once by the site's own ClientApp.

    run_id: the run's id, as the SuperLink gives each run its own (a site's ledger tells
        its studies apart by it).
    drop: per node, the exchange (a secure aggregation stage, or 'train' / 'evaluate') at
        which the site stops answering, as a site that goes offline mid-round.
    sent, received: every message the ServerApp sent and every reply it got: its whole
        view of the sites.
    stopped: why the run stopped early, '' when it completed (Flower records such a run
        as failed with this reason: server/run_outcome.py).
    clientapp: what answers every message: the honest ClientApp, or the one that bends it
        at the audit's canary clients (simulations.canary_clients).
    """

    nodes: list[int]
    run_config: dict[str, Any]
    run_id: int = 7
    drop: dict[int, str] = field(default_factory=dict)
    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    stopped: str = ""
    clientapp: ClientApp = client_app
    contexts: dict[int, Context] = field(init=False)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.contexts = {
            node: Context(
                run_id=self.run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": len(self.nodes)},
                state=RecordDict(),
                run_config=self.run_config,
            )
            for i, node in enumerate(self.nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"message-{next(self._ids)}"  # as the grid sets it on sending
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if self.drop.get(node) == exchange_of(message):
                continue
            reply = self.clientapp(message, self.contexts[node])
            self.received.append(reply)
            replies.append(reply)
        return replies

    def bytes_by_node(self) -> tuple[dict[int, int], dict[int, int]]:
        """(what each site sent, what it was sent): the serialized size of the messages' content."""
        up: dict[int, int] = dict.fromkeys(self.nodes, 0)
        down: dict[int, int] = dict.fromkeys(self.nodes, 0)
        for message in self.sent:
            down[message.metadata.dst_node_id] += recorddict_to_proto(message.content).ByteSize()
        for reply in self.received:
            if reply.has_content():
                up[reply.metadata.src_node_id] += recorddict_to_proto(reply.content).ByteSize()
        return up, down


def node_ids(sites: int) -> list[int]:
    """The node ids of an in-process federation of `sites` sites."""
    return [FIRST_NODE + 977 * i for i in range(sites)]


def exchange_of(message: Message) -> str:
    """The exchange a message belongs to: its secure aggregation stage, or its type."""
    record = message.content.config_records.get(RECORD)
    return str(record["stage"]) if record is not None else message.metadata.message_type


def run_in_process(
    settings: dict[str, Any], sites: int, run_dir: Path, drop: dict[int, str] | None = None, run_id: int = 7
) -> InProcessGrid:
    """Run the ServerApp over `sites` simulated sites (and the run's canary clients, after
    them) in this process; `settings` are run settings (a run config's keys). The run
    directory is `run_dir`, the sites' state under it. The caller's Flower task identity
    must be set (a ClientApp's messages need one)."""
    config = {"run-dir": str(run_dir), "federation-home": str(run_dir / "federation"), **settings}
    run = RunConfig.from_flower(config)
    write_site_files(run.data, sites, run_dir, gradient_canaries(run))
    canaries = run.data.audit_canary_clients
    grid = InProcessGrid(
        node_ids(sites + canaries), config, run_id, drop or {}, clientapp=canary_client_app if canaries else client_app
    )
    try:
        server_main(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config))  # type: ignore[arg-type]
    except RunStopped as stopped:
        grid.stopped = str(stopped)
    return grid
