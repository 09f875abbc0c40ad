"""Spotting a run that is not learning, while it runs.

A learning rate tuned for DP-SGD's clipped, noisy gradients makes plain SGD diverge, and
the reverse barely moves: either way the run goes on quietly to a useless model. After a
few rounds, a global accuracy still near chance, or a loss that is not finite or has
risen well above where it started, is said out loud once.
"""

from __future__ import annotations

import math

from server.records import RoundRecord

GRACE_ROUNDS = 5
# Accuracy within this factor of chance (1 / classes) counts as "at chance".
CHANCE_FACTOR = 1.5
LOSS_RISE = 1.5


def divergence(metrics: list[RoundRecord], num_classes: int) -> str | None:
    """Why the run looks broken, or None while it looks like it is learning."""
    if not metrics:
        return None
    last = metrics[-1]
    if not math.isfinite(last.loss):
        return f"the global loss is {last.loss} in round {last.round}: training diverged"
    if len(metrics) < GRACE_ROUNDS:
        return None
    chance = 1 / num_classes
    if last.accuracy <= CHANCE_FACTOR * chance:
        return (
            f"global accuracy {last.accuracy:.3f} after {len(metrics)} "
            f"rounds is near chance ({chance:.3f}): the model is not learning"
        )
    first = metrics[0].loss
    if last.loss > LOSS_RISE * first:
        return f"the global loss rose from {first:.3f} to {last.loss:.3f}: training is diverging"
    return None


def advice(reason: str) -> str:
    return (
        f"{reason}; check learning-rate and batch-size for this DP mode (0 picks the tuned defaults), "
        "or stop the run with Ctrl-C"
    )
