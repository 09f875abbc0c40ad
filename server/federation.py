"""The federated round loop, one shape for every DP level and every way of collecting:
collect, release, evaluate, persist.

Flower's strategy decides sampling and aggregation; this loop adds what Flower lacks: a
timeout on every exchange (server.exchange), a collect stage that checks every reply before
it counts (server.collect), weights the server chose, per-site records taken from the
sites' signed ledger entries, per-round checkpoints and resumption. What differs between
DP levels is asked of the run's DPPolicy (server.dp_policy); what differs between ways of
gathering contributions (in the clear, or secure aggregation), of its CollectStage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.evaluation import Evaluation
from server.checkpoint import Checkpoint, latest_checkpoint
from server.collect import CollectStage, Contributions
from server.dp_policy import DPPolicy, Release
from server.exchange import Exchange
from server.optimizer_state import optimizer_state
from server.records import CentralRelease, RoundReport, Stage
from server.reply_checks import ReplyChecker, SiteEvaluation
from server.run_config import RunConfig
from server.rundir import RunDirectory, append_lines, keep_rounds_up_to
from server.site_registry import SiteRegistry
from server.study_ask import ask_sites

CentralEvaluator = Callable[[ArrayRecord], Evaluation]


@dataclass
class FederationState:
    """What the loop carries from round to round (and what a checkpoint restores)."""

    next_round: int
    arrays: ArrayRecord
    registry: SiteRegistry = field(default_factory=SiteRegistry)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    refused_nodes: dict[int, str] = field(default_factory=dict)
    refusal_reasons: dict[str, str] = field(default_factory=dict)
    declined_evaluation: set[int] = field(default_factory=set)
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


def _declined_evaluation(state: FederationState, node: int) -> bool:
    """A site's policy does not change within a run: once it declined, whichever node it
    runs as now (a restarted SuperNode gets a new id) is not asked again."""
    names = {state.registry.name_of(declined) for declined in state.declined_evaluation} - {None}
    return node in state.declined_evaluation or state.registry.name_of(node) in names


def in_model_dtypes(aggregated: ArrayRecord, model: ArrayRecord) -> ArrayRecord:
    """Some strategies compute in float64 (q-FedAvg's loss powers); the global model keeps
    the model's own dtypes, which every site's reply is checked against."""
    return ArrayRecord(
        {name: Array(array.numpy().astype(model[name].numpy().dtype, copy=False)) for name, array in aggregated.items()}
    )


@dataclass
class Federation:
    """One run's fixed parts: where contributions come from and what decides about them.

    collect: gathers each round's contributions (server.collect); exchange and checker:
    the same exchanges and checks, for the evaluation stage.
    """

    grid: Grid
    run: RunConfig
    run_dir: RunDirectory
    strategy: Strategy
    policy: DPPolicy
    collect: CollectStage
    exchange: Exchange
    checker: ReplyChecker
    evaluate_centrally: CentralEvaluator

    def run_rounds(self, state: FederationState) -> FederationState:
        for server_round in range(state.next_round, self.run.training.rounds + 1):
            started = time.monotonic()
            report = RoundReport(server_round)
            if server_round == 1 and self.run.dp.sample_level:  # the study's ask: sites grant their epsilon, or refuse
                ask_sites(self.grid, self.exchange, report)
                state.refused_nodes.update(report.refusals)
                state.refusal_reasons.update(report.refusal_reasons)
            stop = self.policy.stop_before(server_round) or self._too_few_sites(state)
            if stop:
                state.stop_reason = f"stopped before round {server_round}: {stop}"
                log(WARNING, state.stop_reason)
                break
            contributions = self.collect.collect(server_round, state.arrays, set(state.refused_nodes), report)
            release = (
                self.policy.release(server_round, contributions) if contributions.count >= self._min_sites() else None
            )
            if release is not None and release.arrays is not None:
                state.arrays = in_model_dtypes(release.arrays, state.arrays)
            self._evaluate(server_round, state, report)
            evaluation = self.evaluate_centrally(state.arrays)
            state.refused_nodes.update(report.refusals)
            state.refusal_reasons.update(report.refusal_reasons)
            state.declined_evaluation.update(report.declined_evaluation)
            self._persist(state, report, evaluation, release, time.monotonic() - started)
            state.next_round = server_round + 1
            stop = (
                self.policy.stop_after(server_round, list(report.refusals.values()))
                if release
                else self._too_few_updates(server_round, contributions, report)
            )
            if stop:
                state.stop_reason = stop
                log(WARNING, stop)
                break
        return state

    def _evaluate(self, server_round: int, state: FederationState, report: RoundReport) -> None:
        messages = [
            m
            for m in self.strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), self.grid)
            if m.metadata.dst_node_id not in {*state.refused_nodes, *report.refusals}
            and not _declined_evaluation(state, m.metadata.dst_node_id)
        ]
        replies = self.exchange.send(messages, Stage.EVALUATE, report)
        live = set(self.grid.get_node_ids())
        for _, reply in replies:
            checked = self.checker.check_evaluate(reply, live)
            if isinstance(checked, SiteEvaluation):
                report.validated(checked.site, checked.metrics.get("val_loss"), checked.metrics.get("val_accuracy"))
            else:
                report.reject(checked)

    def _persist(
        self,
        state: FederationState,
        report: RoundReport,
        evaluation: Evaluation,
        release: Release | None,
        seconds: float,
    ) -> None:
        central = None
        if self.run.dp.client_level:
            central = (
                release.record
                if release
                else CentralRelease(released=False, reason="too few updates passed the checks")
            )
        record = report.record(
            evaluation.accuracy, evaluation.loss, sorted(set(state.refused_nodes.values())), seconds, central
        )
        text = json.dumps(record.to_json(), sort_keys=True)
        append_lines(self.run_dir.ledger_file, report.ledger)
        append_lines(self.run_dir.metrics_file, [text])
        checkpoint = Checkpoint(
            report.server_round,
            state.arrays.to_torch_state_dict(),
            self.run.fingerprint(),
            text,
            optimizer_state(self.strategy),
            json.dumps(state.registry.to_json()),
        )
        checkpoint.save(self.run_dir.checkpoint_dir)
        log(
            INFO, "Round %d: global accuracy %.4f, loss %.4f", report.server_round, evaluation.accuracy, evaluation.loss
        )

    def _min_sites(self) -> int:
        return max(1, min(self.run.aggregation.min_sites, len(list(self.grid.get_node_ids()))))

    def _too_few_sites(self, state: FederationState) -> str | None:
        remaining = len([node for node in self.grid.get_node_ids() if node not in state.refused_nodes])
        problem = (
            f"{remaining} site(s) can still train, fewer than min-sites={self.run.aggregation.min_sites}"
            if remaining < self.run.aggregation.min_sites
            else self.collect.too_few(remaining)
        )
        if problem is None:
            return None
        reasons = [
            state.refusal_reasons.get(name, f"{name} refused") for name in sorted(set(state.refused_nodes.values()))
        ]
        return f"{problem}; refused: {'; '.join(reasons) or 'none'}"

    def _too_few_updates(self, server_round: int, contributions: Contributions, report: RoundReport) -> str:
        lost = [f"{r.site} ({r.reason})" for r in report.rejected] + [f"{f.site} ({f.reason})" for f in report.failures]
        lost += [f"{site} (refused)" for site in sorted(report.refusals.values())]
        return (
            f"stopped after round {server_round}: {contributions.count} update(s) passed the checks, fewer than "
            f"min-sites={self._min_sites()}; the global model was kept; lost: {'; '.join(lost) or 'none'}"
        )
