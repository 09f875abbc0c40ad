"""The federated round loop: Flower's strategy decides sampling and aggregation, this
loop adds what Flower lacks: per-site records, the privacy ledger, per-round checkpoints
and resumption.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.config import RunConfig
from common.evaluation import Evaluation
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import SAMPLE_LEVEL_DP_SGD, LedgerRecord
from common.rundir import RunDirectory, append_lines, keep_rounds_up_to
from server.checkpoint import Checkpoint, latest_checkpoint

CentralEvaluator = Callable[[ArrayRecord], Evaluation]


@dataclass
class FederationState:
    """What the loop carries from round to round (and what a checkpoint restores)."""

    next_round: int
    arrays: ArrayRecord
    privacy_states: dict[str, str] = field(default_factory=dict)


def initial_state(run: RunConfig, run_dir: RunDirectory, model: torch.nn.Module) -> FederationState:
    """Round 1 from the fresh model, or the round after the newest checkpoint."""
    if not run.resume_from:
        return FederationState(next_round=1, arrays=ArrayRecord(model.state_dict()))
    checkpoint = latest_checkpoint(run_dir.checkpoint_dir, run.fingerprint())
    keep_rounds_up_to(run_dir.metrics_file, checkpoint.round)
    keep_rounds_up_to(run_dir.ledger_file, checkpoint.round)
    log(INFO, "Resuming from checkpoint of round %d", checkpoint.round)
    return FederationState(checkpoint.round + 1, ArrayRecord(checkpoint.weights), dict(checkpoint.privacy_states))


def run_rounds(
    grid: Grid,
    run_id: int,
    run: RunConfig,
    run_dir: RunDirectory,
    strategy: Strategy,
    state: FederationState,
    evaluate_centrally: CentralEvaluator,
) -> FederationState:
    for server_round in range(state.next_round, run.training.rounds + 1):
        started = time.monotonic()
        train_replies = list(grid.send_and_receive(strategy.configure_train(server_round, state.arrays, _train_config(run, state), grid)))
        aggregated, _ = strategy.aggregate_train(server_round, train_replies)
        if aggregated is not None:
            state.arrays = aggregated
        eval_replies = list(grid.send_and_receive(strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), grid)))
        strategy.aggregate_evaluate(server_round, eval_replies)
        central = evaluate_centrally(state.arrays)

        results = _collect_site_results(run_id, server_round, run, train_replies, eval_replies)
        state.privacy_states.update(results.privacy_states)
        record = {
            "round": server_round,
            "global": {"loss": central.loss, "accuracy": central.accuracy},
            "sites": results.sites,
            "failures": results.failures,
            "seconds": round(time.monotonic() - started, 3),
        }
        line = json.dumps(record, sort_keys=True)
        append_lines(run_dir.ledger_file, (entry.to_json() for entry in results.ledger))
        append_lines(run_dir.metrics_file, [line])
        checkpoint = Checkpoint(server_round, state.arrays.to_torch_state_dict(), run.fingerprint(), dict(state.privacy_states), line)
        checkpoint.save(run_dir.checkpoint_dir)
        log(INFO, "Round %d: global accuracy %.4f, loss %.4f", server_round, central.accuracy, central.loss)
        state.next_round = server_round + 1
    return state


def _train_config(run: RunConfig, state: FederationState) -> ConfigRecord:
    """Every round carries the latest known privacy state of every site, so a site whose
    own memory of the run is gone (a resumed run starts new processes) continues its
    accounting instead of restarting it at zero."""
    config = ConfigRecord({protocol.CONFIG_PRIVACY_STATES: json.dumps(state.privacy_states)})
    if run.training.strategy == "fedprox":
        config[protocol.CONFIG_PROXIMAL_MU] = run.training.proximal_mu
    return config


@dataclass
class RoundResults:
    """What the sites' replies to one round say, per site."""

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    ledger: list[LedgerRecord] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    privacy_states: dict[str, str] = field(default_factory=dict)


def _collect_site_results(
    run_id: int,
    server_round: int,
    run: RunConfig,
    train_replies: Iterable[Message],
    eval_replies: Iterable[Message],
) -> RoundResults:
    results = RoundResults()
    sites, ledger, failures = results.sites, results.ledger, results.failures
    for reply in train_replies:
        if reply.has_error():
            failures.append({"node": reply.metadata.src_node_id, "stage": "train", "reason": reply.error.reason})
            log(WARNING, "Round %d: node %d did not train: %s", server_round, reply.metadata.src_node_id, reply.error.reason)
            continue
        name = str(reply.content[protocol.SITE][protocol.SITE_NAME])
        metrics = reply.content[protocol.METRICS]
        entry = sites.setdefault(name, {})
        entry.update(
            num_examples=int(metrics["num-examples"]),
            train_loss=float(metrics["train-loss"]),
            train_accuracy=float(metrics["train-accuracy"]),
            epsilon=None,
        )
        privacy_json = str(reply.content[protocol.SITE][protocol.SITE_PRIVACY_STATE])
        if privacy_json:
            privacy = PrivacyState.from_json(privacy_json)
            entry.update(
                epsilon=float(metrics["epsilon"]),
                delta=float(metrics["delta"]),
                budget=float(metrics["budget-epsilon"]),
                noise_multiplier=privacy.noise_multiplier,
            )
            results.privacy_states[name] = privacy_json
            ledger.append(
                LedgerRecord(
                    run_id=run_id,
                    round=server_round,
                    site=name,
                    mechanism=SAMPLE_LEVEL_DP_SGD,
                    noise_multiplier=privacy.noise_multiplier,
                    sample_rate=privacy.sample_rate,
                    sampling="poisson",
                    steps=int(metrics["steps"]),
                    clip_norm=run.dp.clip_norm,
                    delta=float(metrics["delta"]),
                    epsilon=float(metrics["epsilon"]),
                    accountant=privacy.accountant,
                )
            )
    for reply in eval_replies:
        if reply.has_error():
            failures.append({"node": reply.metadata.src_node_id, "stage": "evaluate", "reason": reply.error.reason})
            continue
        name = str(reply.content[protocol.SITE][protocol.SITE_NAME])
        metrics = reply.content[protocol.METRICS]
        sites.setdefault(name, {}).update(val_loss=float(metrics["val-loss"]), val_accuracy=float(metrics["val-accuracy"]))
    results.sites = dict(sorted(sites.items()))
    return results
