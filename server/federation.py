"""The federated round loop, one shape for every DP level:
train, check, aggregate, evaluate, persist.

Flower's strategy decides sampling and aggregation; this loop adds what Flower lacks: a
timeout on every exchange, a check of every reply before it counts (server.reply_checks),
weights the server chose, per-site records taken from the sites' signed ledger entries,
per-round checkpoints and resumption. What differs between DP levels is asked of the
run's DPPolicy (server.dp_policy).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.config import RunConfig
from common.evaluation import Evaluation
from common.rundir import RunDirectory, append_lines, keep_rounds_up_to
from server.aggregation_weight import rewrite_for_aggregation
from server.checkpoint import Checkpoint, latest_checkpoint
from server.dp_policy import DPPolicy
from server.reply_checks import ReplyChecker, Rejection, SiteEvaluation, Update, one_line
from server.site_registry import SiteRegistry
from server.strategies import optimizer_state

CentralEvaluator = Callable[[ArrayRecord], Evaluation]

# Without a configured reply-timeout: the first exchange of a stage may take this long
# (sites load data and build models; Ray starts its workers), later ones a multiple of the
# slowest complete one so far, never less than the floor.
FIRST_EXCHANGE_TIMEOUT_S = 600.0
TIMEOUT_FACTOR = 4.0
TIMEOUT_FLOOR_S = 60.0


@dataclass
class FederationState:
    """What the loop carries from round to round (and what a checkpoint restores)."""

    next_round: int
    arrays: ArrayRecord
    registry: SiteRegistry = field(default_factory=SiteRegistry)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    refused_nodes: dict[int, str] = field(default_factory=dict)
    stop_reason: str = ""


def initial_state(run: RunConfig, run_dir: RunDirectory, model: torch.nn.Module) -> FederationState:
    """Round 1 from the fresh model, or the round after the newest checkpoint."""
    if not run.resume_from:
        return FederationState(next_round=1, arrays=ArrayRecord(model.state_dict()))
    checkpoint = latest_checkpoint(run_dir.checkpoint_dir, run.fingerprint())
    run_dir.reopen()
    # Metrics of rounds after the checkpoint are redone; ledger entries are kept: those
    # releases happened, and the sites' budgets paid for them.
    keep_rounds_up_to(run_dir.metrics_file, checkpoint.round)
    log(INFO, "Resuming from checkpoint of round %d", checkpoint.round)
    registry = SiteRegistry.from_json(json.loads(checkpoint.sites))
    return FederationState(checkpoint.round + 1, ArrayRecord(checkpoint.weights), registry, checkpoint.optimizer)


def in_model_dtypes(aggregated: ArrayRecord, model: ArrayRecord) -> ArrayRecord:
    """Some strategies compute in float64 (q-FedAvg's loss powers); the global model keeps
    the model's own dtypes, which every site's reply is checked against."""
    return ArrayRecord({name: Array(array.numpy().astype(model[name].numpy().dtype, copy=False)) for name, array in aggregated.items()})


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
class RoundRecord:
    """What one round says of each site, as metrics.jsonl records it."""

    server_round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    refusals: dict[int, str] = field(default_factory=dict)
    ledger: list[str] = field(default_factory=list)

    def reject(self, rejection: Rejection) -> None:
        log(WARNING, "Round %d: rejected %s reply of %s: %s", self.server_round, rejection.stage, rejection.site, rejection.reason)
        self.rejected.append(rejection)
        if rejection.entry is not None:
            self.ledger.append(rejection.entry.to_json())


@dataclass
class Federation:
    """One run's fixed parts: where replies come from and what decides about them."""

    grid: Grid
    run: RunConfig
    run_dir: RunDirectory
    strategy: Strategy
    policy: DPPolicy
    evaluate_centrally: CentralEvaluator
    run_id: int

    def run_rounds(self, state: FederationState) -> FederationState:
        checker = ReplyChecker(self.run, self.run_id, state.registry)
        timeout = ReplyTimeout(self.run.checks.reply_timeout)
        for server_round in range(state.next_round, self.run.training.rounds + 1):
            started = time.monotonic()
            stop = self.policy.stop_before(server_round) or self._too_few_sites(state)
            if stop:
                state.stop_reason = f"stopped before round {server_round}: {stop}"
                log(WARNING, state.stop_reason)
                break
            record = RoundRecord(server_round)
            updates = self._train(server_round, state, checker, timeout, record)
            release = self.policy.release(server_round, updates) if len(updates) >= self._min_sites() else None
            if release is not None and release.arrays is not None:
                state.arrays = in_model_dtypes(release.arrays, state.arrays)
            self._evaluate(server_round, state, checker, timeout, record)
            evaluation = self.evaluate_centrally(state.arrays)
            state.refused_nodes.update(record.refusals)
            self._persist(state, record, evaluation, release.record if release else None, time.monotonic() - started)
            state.next_round = server_round + 1
            stop = self.policy.stop_after(server_round, list(record.refusals.values())) if release else self._too_few_updates(server_round, updates, record)
            if stop:
                state.stop_reason = stop
                log(WARNING, stop)
                break
        return state

    def _train(self, server_round: int, state: FederationState, checker: ReplyChecker, timeout: ReplyTimeout, record: RoundRecord) -> list[Update]:
        messages = [m for m in self.strategy.configure_train(server_round, state.arrays, _train_config(self.run), self.grid) if m.metadata.dst_node_id not in state.refused_nodes]
        replies = self._exchange(messages, "train", timeout, record, state.registry)
        live = set(self.grid.get_node_ids())
        updates: list[Update] = []
        for node, reply in replies:
            if reply.has_error():
                self._error_reply(node, reply, "train", record, state.registry)
                continue
            checked = checker.check_train(server_round, reply, state.arrays, live)
            if isinstance(checked, Rejection):
                record.reject(checked)
            else:
                updates.append(checked)
        updates.sort(key=lambda update: update.site)  # replies arrive in any order; the float sums of aggregation must not depend on it
        limit = self.policy.norm_limit([u.norm for u in updates])
        for update in [u for u in updates if u.norm > limit]:
            record.reject(Rejection(update.node, update.site, "train", f"sent an update of norm {update.norm:.4g}, above the bound {limit:.4g}", update.entry))
        updates = [u for u in updates if u.norm <= limit]
        for update in updates:
            record.sites[update.site] = update.site_record()
            record.ledger.append(update.entry.to_json())
        rewrite_for_aggregation(updates, self.run)
        return updates

    def _evaluate(self, server_round: int, state: FederationState, checker: ReplyChecker, timeout: ReplyTimeout, record: RoundRecord) -> None:
        messages = [m for m in self.strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), self.grid) if m.metadata.dst_node_id not in {*state.refused_nodes, *record.refusals}]
        live = set(self.grid.get_node_ids())
        for node, reply in self._exchange(messages, "evaluate", timeout, record, state.registry):
            if reply.has_error():
                self._error_reply(node, reply, "evaluate", record, state.registry)
                continue
            checked = checker.check_evaluate(reply, live)
            if isinstance(checked, SiteEvaluation):
                record.sites.setdefault(checked.site, {}).update(checked.metrics)
            else:
                record.reject(checked)

    def _exchange(self, messages: list[Message], stage: str, timeout: ReplyTimeout, record: RoundRecord, registry: SiteRegistry) -> list[tuple[int, Message]]:
        """Send and wait at most the stage's timeout; a site that did not answer failed this round.

        Each reply comes with the node it answers for: the node the message was sent to.
        That is not always its sender: the SuperLink itself answers, with an error, for a
        node that stopped sending heartbeats (a killed SuperNode)."""
        if not messages:
            return []
        seconds = timeout.seconds(stage)
        started = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=seconds))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # the grid set the ids on sending
        answers = [(sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
        silent = sorted({m.metadata.dst_node_id for m in messages} - {node for node, _ in answers})
        if silent:
            for node in silent:
                record.failures.append({"node": node, "site": registry.name_of(node) or f"node {node}", "stage": stage, "reason": f"no reply within {seconds:.0f}s"})
            log(WARNING, "Round %d: no %s reply within %.0fs from node(s) %s", record.server_round, stage, seconds, silent)
        else:
            timeout.observe(stage, time.monotonic() - started)
        return answers

    def _error_reply(self, node: int, reply: Message, stage: str, record: RoundRecord, registry: SiteRegistry) -> None:
        reason = one_line(reply.error.reason)
        if stage == "train" and reply.error.code == protocol.SITE_REFUSED:
            record.refusals[node] = registry.name_of(node) or _site_named_in(reason, node)
            log(WARNING, "Round %d: %s; it is out of this run", record.server_round, reason)
            return
        if stage == "evaluate" and reply.error.code == protocol.SITE_DECLINED_EVALUATION:
            log(INFO, "Round %d: %s", record.server_round, reason)  # the site's policy: not a failure
            return
        record.failures.append({"node": node, "site": registry.name_of(node) or f"node {node}", "stage": stage, "reason": reason})
        log(WARNING, "Round %d: node %d failed to %s: %s", record.server_round, node, stage, reason)

    def _persist(self, state: FederationState, record: RoundRecord, evaluation: Evaluation, release: dict[str, Any] | None, seconds: float) -> None:
        line: dict[str, Any] = {
            "round": record.server_round,
            "global": {"loss": evaluation.loss, "accuracy": evaluation.accuracy},
            "sites": dict(sorted(record.sites.items())),
            "refused": sorted(set(state.refused_nodes.values())),
            "failures": record.failures,
            "rejected": [r.to_json() for r in record.rejected],
            "seconds": round(seconds, 3),
        }
        if self.run.dp.client_level:
            line["client_level"] = release or {"released": False, "reason": "too few updates passed the checks"}
        text = json.dumps(line, sort_keys=True)
        append_lines(self.run_dir.ledger_file, record.ledger)
        append_lines(self.run_dir.metrics_file, [text])
        checkpoint = Checkpoint(
            record.server_round, state.arrays.to_torch_state_dict(), self.run.fingerprint(), text, optimizer_state(self.strategy), json.dumps(state.registry.to_json())
        )
        checkpoint.save(self.run_dir.checkpoint_dir)
        log(INFO, "Round %d: global accuracy %.4f, loss %.4f", record.server_round, evaluation.accuracy, evaluation.loss)

    def _min_sites(self) -> int:
        return max(1, min(self.run.training.min_sites, len(list(self.grid.get_node_ids()))))

    def _too_few_sites(self, state: FederationState) -> str | None:
        remaining = [node for node in self.grid.get_node_ids() if node not in state.refused_nodes]
        if len(remaining) >= self.run.training.min_sites:
            return None
        return (
            f"{len(remaining)} site(s) can still train, fewer than min-sites={self.run.training.min_sites}; "
            f"refused: {', '.join(sorted(state.refused_nodes.values()))}"
        )

    def _too_few_updates(self, server_round: int, updates: list[Update], record: RoundRecord) -> str:
        lost = [f"{r.site} ({r.reason})" for r in record.rejected] + [f"{f['site']} ({f['reason']})" for f in record.failures]
        lost += [f"{site} (refused)" for site in sorted(record.refusals.values())]
        return (
            f"stopped after round {server_round}: {len(updates)} update(s) passed the checks, fewer than "
            f"min-sites={self._min_sites()}; the global model was kept; lost: {'; '.join(lost) or 'none'}"
        )


def _train_config(run: RunConfig) -> ConfigRecord:
    config = ConfigRecord()
    if run.training.strategy == "fedprox":
        config[protocol.CONFIG_PROXIMAL_MU] = run.training.proximal_mu
    return config


def _site_named_in(reason: str, node: int) -> str:
    """Refusals start 'site NAME refuses ...'; fall back to the node id."""
    words = reason.split()
    return words[1] if len(words) > 1 and words[0] == "site" else f"node {node}"
