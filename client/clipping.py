"""Client-side clipping for client-level DP: Flower's own mods, when the server asks.

Flower's `fixedclipping_mod` and `adaptiveclipping_mod` fail any message that carries no
clipping norm, so they cannot sit on every training message; this mod hands a message
to the right one only when the server's DP wrapper sent a norm (clipping-side=client).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common import protocol
from common.config import SiteRunConfig


def central_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    config = msg.content.config_records.get(protocol.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:  # secure aggregation's key stages carry no config
        return call_next(msg, context)
    adaptive = SiteRunConfig.from_flower(context.run_config).dp.client_clipping == "adaptive"
    return (adaptiveclipping_mod if adaptive else fixedclipping_mod)(msg, context, call_next)
