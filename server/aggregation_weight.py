"""How much each accepted update weighs, from what the server can trust.

Flower's strategies weigh an update by a key in its MetricRecord, which the site writes
itself: a site that claims 10^12 examples would replace the global model. Before any
strategy sees them, the accepted replies are rewritten to carry their arrays and the
weight the server chose, under server.strategies.AGGREGATION_WEIGHT, which the strategies weigh by.
"""

from __future__ import annotations

import statistics

from flwr.app import MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from common import protocol
from server.reply_checks import Update
from server.run_config import ChecksConfig, RunConfig
from server.strategies import AGGREGATION_WEIGHT, STRATEGIES


def weights_for(updates: list[Update], checks: ChecksConfig) -> list[float]:
    """Uniform, or each site's reported example count capped (by example_cap, or by the
    round's median report so that no single site can outweigh the rest). A site that
    reports no count weighs as the cap."""
    if checks.aggregation_weight == "uniform" or not updates:
        return [1.0] * len(updates)
    reported = [u.reported_examples for u in updates if u.reported_examples is not None]
    cap = checks.example_cap or (statistics.median_low(reported) if reported else 1)
    return [float(min(u.reported_examples, cap)) if u.reported_examples is not None else float(cap) for u in updates]


def rewrite_for_aggregation(updates: list[Update], run: RunConfig) -> None:
    """Leave in each reply only its checked arrays, the server's weight, under q-FedAvg
    its training loss, and under client-side adaptive clipping the clipping bit Flower's
    wrapper counts. Every reply then carries the same keys (the checks rejected a reply
    without a loss under q-FedAvg, or without a bit under that clipping): Flower's
    strategies refuse to aggregate replies whose keys differ, so one site's choice of
    what to send must not decide whether the round aggregates."""
    for update, weight in zip(updates, weights_for(updates, run.checks), strict=True):
        metrics = MetricRecord({AGGREGATION_WEIGHT: weight})
        if STRATEGIES[run.aggregation.strategy].needs_train_loss:  # checked finite
            metrics[protocol.TRAIN_LOSS] = update.metrics["train_loss"]
        if update.norm_bit is not None:
            metrics[KEY_NORM_BIT] = update.norm_bit
        update.reply.content = RecordDict({protocol.ARRAYS: update.arrays, protocol.METRICS: metrics})
