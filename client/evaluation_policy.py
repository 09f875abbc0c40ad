"""Whether a site answers an evaluation request: its policy's answer-evaluation.

Kept free of PyTorch so that a deployed site's runner (client/site_runner.py) can decline
a request before any code that touches the site's data is even loaded; the ClientApp's
evaluate handler asks the same question for simulated sites, which have no such runner.
"""

from __future__ import annotations

from flwr.app import Error, Message

from client.policy import SiteConfig
from common import protocol


def declined_evaluation(msg: Message, site: SiteConfig) -> Message | None:
    """The reply that declines `msg`, or None when the site's policy lets it answer."""
    if site.answer_evaluation:
        return None
    reason = f"site {site.name} does not evaluate models it is sent; its policy says answer-evaluation=false"
    return Message(Error(code=protocol.SITE_DECLINED_EVALUATION, reason=reason), reply_to=msg)
