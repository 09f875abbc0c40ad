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
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.config import RunConfig
from common.evaluation import Evaluation
from common.rundir import RunDirectory, append_lines, keep_rounds_up_to
from server.central_dp import CentralPrivacy, clipping_norm_of
from server.checkpoint import Checkpoint, latest_checkpoint

CentralEvaluator = Callable[[ArrayRecord], Evaluation]


@dataclass
class FederationState:
    """What the loop carries from round to round (and what a checkpoint restores)."""

    next_round: int
    arrays: ArrayRecord
    privacy_states: dict[str, str] = field(default_factory=dict)
    refused_nodes: dict[int, str] = field(default_factory=dict)
    stop_reason: str = ""


def initial_state(run: RunConfig, run_dir: RunDirectory, model: torch.nn.Module) -> FederationState:
    """Round 1 from the fresh model, or the round after the newest checkpoint."""
    if not run.resume_from:
        return FederationState(next_round=1, arrays=ArrayRecord(model.state_dict()))
    checkpoint = latest_checkpoint(run_dir.checkpoint_dir, run.fingerprint())
    # Metrics of rounds after the checkpoint are redone; ledger entries are kept: those
    # releases happened, and the sites' budgets paid for them.
    keep_rounds_up_to(run_dir.metrics_file, checkpoint.round)
    log(INFO, "Resuming from checkpoint of round %d", checkpoint.round)
    return FederationState(checkpoint.round + 1, ArrayRecord(checkpoint.weights), dict(checkpoint.privacy_states))


def run_rounds(
    grid: Grid,
    run: RunConfig,
    run_dir: RunDirectory,
    strategy: Strategy,
    state: FederationState,
    evaluate_centrally: CentralEvaluator,
    central: CentralPrivacy | None = None,
) -> FederationState:
    """central: the run's client-level DP, or None when sites protect their own data."""
    for server_round in range(state.next_round, run.training.rounds + 1):
        started = time.monotonic()
        if central is not None and (over := central.over_budget()):
            state.stop_reason = f"stopped before round {server_round}: {over}"
            log(WARNING, state.stop_reason)
            break
        remaining = [node for node in grid.get_node_ids() if node not in state.refused_nodes]
        if len(remaining) < run.training.min_sites:
            state.stop_reason = (
                f"stopped before round {server_round}: {len(remaining)} site(s) can still train, fewer than "
                f"min-sites={run.training.min_sites}; refused: {', '.join(sorted(state.refused_nodes.values()))}"
            )
            log(WARNING, state.stop_reason)
            break
        train_messages = [m for m in strategy.configure_train(server_round, state.arrays, _train_config(run), grid) if m.metadata.dst_node_id not in state.refused_nodes]
        train_replies = list(grid.send_and_receive(train_messages))
        if central is None:
            aggregated, _ = strategy.aggregate_train(server_round, train_replies)
        else:
            aggregated, client_level = _central_release(central, strategy, server_round, train_replies)
        if aggregated is not None:
            state.arrays = aggregated
        eval_messages = [m for m in strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), grid) if m.metadata.dst_node_id not in state.refused_nodes]
        eval_replies = list(grid.send_and_receive(eval_messages))
        strategy.aggregate_evaluate(server_round, eval_replies)
        evaluation = evaluate_centrally(state.arrays)

        results = _collect_site_results(server_round, train_replies, eval_replies)
        state.privacy_states.update(results.privacy_states)
        state.refused_nodes.update(results.refusals)
        record = {
            "round": server_round,
            "global": {"loss": evaluation.loss, "accuracy": evaluation.accuracy},
            "sites": results.sites,
            "refused": sorted(state.refused_nodes.values()),
            "failures": results.failures,
            "seconds": round(time.monotonic() - started, 3),
        }
        if central is not None:
            record["client_level"] = client_level
        line = json.dumps(record, sort_keys=True)
        append_lines(run_dir.ledger_file, results.ledger)
        append_lines(run_dir.metrics_file, [line])
        checkpoint = Checkpoint(server_round, state.arrays.to_torch_state_dict(), run.fingerprint(), dict(state.privacy_states), line)
        checkpoint.save(run_dir.checkpoint_dir)
        log(INFO, "Round %d: global accuracy %.4f, loss %.4f", server_round, evaluation.accuracy, evaluation.loss)
        state.next_round = server_round + 1
        if central is not None and results.refusals:
            state.stop_reason = (
                f"stopped after round {server_round}: client-level DP scales its noise for {central.sample_size} "
                f"sites per round, and {', '.join(sorted(results.refusals.values()))} refused to train"
            )
            log(WARNING, state.stop_reason)
            break
    return state


def _central_release(central: CentralPrivacy, strategy: Strategy, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """Release the noised mean only when the noise fits the replies, and ledger it."""
    problem = central.incomplete(replies)
    if problem is not None:
        log(WARNING, "Round %d: no client-level release: %s", server_round, problem)
        epsilon = central.epsilon_after()
        return None, {"released": False, "reason": problem, "epsilon": epsilon, "budget": central.run.dp.client_epsilon}
    clip_norm = clipping_norm_of(strategy)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    epsilon = central.record(server_round, aggregated, clip_norm)
    return aggregated, {
        "released": True,
        "epsilon": epsilon,
        "delta": central.run.dp.client_delta,
        "budget": central.run.dp.client_epsilon,
        "noise_multiplier": central.noise.accounted,
        "clip_norm": clip_norm,
    }


def _train_config(run: RunConfig) -> ConfigRecord:
    config = ConfigRecord()
    if run.training.strategy == "fedprox":
        config[protocol.CONFIG_PROXIMAL_MU] = run.training.proximal_mu
    return config


@dataclass
class RoundResults:
    """What the sites' replies to one round say, per site."""

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    ledger: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    privacy_states: dict[str, str] = field(default_factory=dict)
    refusals: dict[int, str] = field(default_factory=dict)


def _collect_site_results(server_round: int, train_replies: Iterable[Message], eval_replies: Iterable[Message]) -> RoundResults:
    results = RoundResults()
    sites = results.sites
    for reply in train_replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            if reply.error.code == protocol.SITE_REFUSED:
                results.refusals[node] = _site_named_in(reply.error.reason, node)
                log(WARNING, "Round %d: %s; it is out of this run", server_round, reply.error.reason)
            else:
                results.failures.append({"node": node, "stage": "train", "reason": reply.error.reason})
                log(WARNING, "Round %d: node %d did not train: %s", server_round, node, reply.error.reason)
            continue
        site_record = reply.content[protocol.SITE]
        name = str(site_record[protocol.SITE_NAME])
        metrics = reply.content[protocol.METRICS]
        entry = sites.setdefault(name, {})
        # A site sends only the metrics its policy allows (common/site.py): all are optional
        # but the example count Flower's strategies weigh by.
        entry.update(
            num_examples=int(metrics["num-examples"]),
            train_loss=_optional(metrics, "train-loss"),
            train_accuracy=_optional(metrics, "train-accuracy"),
            epsilon=None,
        )
        results.ledger.append(str(site_record[protocol.SITE_LEDGER_ENTRY]))
        privacy_json = str(site_record[protocol.SITE_PRIVACY_STATE])
        if privacy_json:
            entry.update(
                epsilon=_optional(metrics, "epsilon"),
                delta=_optional(metrics, "delta"),
                budget=_optional(metrics, "budget-epsilon"),
                noise_multiplier=_optional(metrics, "noise-multiplier"),
            )
            results.privacy_states[name] = privacy_json
    for reply in eval_replies:
        if reply.has_error():
            results.failures.append({"node": reply.metadata.src_node_id, "stage": "evaluate", "reason": reply.error.reason})
            continue
        name = str(reply.content[protocol.SITE][protocol.SITE_NAME])
        metrics = reply.content[protocol.METRICS]
        sites.setdefault(name, {}).update(val_loss=_optional(metrics, "val-loss"), val_accuracy=_optional(metrics, "val-accuracy"))
    results.sites = dict(sorted(sites.items()))
    return results


def _optional(metrics: MetricRecord, key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def _site_named_in(reason: str, node: int) -> str:
    """Refusals start 'site NAME refuses ...'; fall back to the node id."""
    words = reason.split()
    return words[1] if len(words) > 1 and words[0] == "site" else f"node {node}"
