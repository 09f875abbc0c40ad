"""Canary clients in a simulation (server/canary_clients.py): the honest ClientApp, whose
reply a canary client replaces with its direction.

With `audit-canary-clients = K` the simulation starts K more clients after its real sites
(partition ids num-sites onwards, each holding two blank images: simulations/federation.py)
and submits a copy of the app whose ClientApp is `app` below, as it does for hostile sites
(simulations/attacks.py). A real site runs the honest ClientApp untouched. Canary client i
runs it too, as a simulated client named canary-i with its own state directory (under the
federation home's audit-canary-clients/) whose policy allows training without local DP, as
client-level DP's clients do, and declines to evaluate, so that it weighs in no accuracy
figure. Then it sends, instead of what it trained, the global model plus its direction at
CANARY_OVERSHOOT times the clip norm, signs its own ledger entry for that, and hands it to
the clipping every client's update goes through (Flower's mod when clients clip, the
server's DP wrapper otherwise), which cuts it to exactly the round's clip norm, adaptive or
fixed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import app as honest
from client.app import train as honest_training
from client.clipping import central_dp_clipping_mod
from common import protocol
from common.secure_aggregation.model_vector import dimension, plus_vector
from server.canary_clients import CANARY_CLIENT_DIR, canary_client_name, canary_direction
from server.run_config import RunConfig
from simulations.attacks import send_instead

# Adaptive clipping moves the clip norm from its starting value geometrically, by
# e^(-clip-norm-lr x (noisy share clipped - target)) a round, and every canary update counts
# as clipped, which pulls it down: a thousand times the starting norm is far above any norm
# a run reaches, so the round's clipping sets a canary's size (audit.one_shot checks it did).
CANARY_OVERSHOOT = 1000.0

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    canary = _canary_of(context)
    if canary is None:
        return honest(msg, context)
    run, index = canary
    return central_dp_clipping_mod(msg, _as_canary(context, run, index), partial(_direction_reply, run, index))


@app.query()
def ask(msg: Message, context: Context) -> Message:
    canary = _canary_of(context)
    return honest(msg, context if canary is None else _as_canary(context, *canary))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    canary = _canary_of(context)
    return honest(msg, context if canary is None else _as_canary(context, *canary))


def _canary_of(context: Context) -> tuple[RunConfig, int] | None:
    """The run and this client's canary index, or None for a real site (partition ids
    below num-partitions - K)."""
    run = RunConfig.from_flower(context.run_config)
    partition = int(context.node_config.get("partition-id", -1))
    first = int(context.node_config.get("num-partitions", 0)) - run.data.audit_canary_clients
    return (run, partition - first) if run.data.audit_canary_clients and partition >= first >= 0 else None


def _as_canary(context: Context, run: RunConfig, index: int) -> Context:
    """The canary client's own identity and policy: its name, its state directory, training
    without local DP, no evaluation."""
    name = canary_client_name(index)
    node_config = {
        **context.node_config,
        "site-name": name,
        "state-dir": str(Path(run.federation_home) / CANARY_CLIENT_DIR / name),
        "allow-non-private": True,
        "answer-evaluation": False,
    }
    return Context(context.run_id, context.node_id, node_config, context.state, context.run_config)


def _direction_reply(run: RunConfig, index: int, msg: Message, context: Context) -> Message:
    """The honest reply, its model replaced by the global model plus the canary's direction."""
    reply = honest_training(msg, context)
    if reply.has_error():
        return reply
    sent = msg.content.array_records[protocol.ARRAYS]
    size = CANARY_OVERSHOOT * run.dp.clip_norm
    send_instead(reply, plus_vector(sent, size * canary_direction(run.data.seed, index, dimension(sent))), context)
    return reply
