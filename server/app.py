"""The ServerApp: Flower's strategy over the round loop, central evaluation on the
held-out test set, and the run directory. A run that stops early ends as failed in
Flower's records too (server/run_outcome.py)."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.errors import CohortInputError
from common.evaluation import Evaluation, evaluate
from common.flower_logs import readable_flower_logs
from common.models.registry import build_model
from common.secure_aggregation.model_vector import dimension
from server.audit_transcript import AuditTranscript
from server.canary_clients import canary_client_names
from server.central_dp import CentralPrivacy, coordinator_noise, wrap_with_central_dp
from server.collect import CollectStage, PlainCollect, require_compatible
from server.distributed_dp import DistributedPrivacy
from server.dp_policy import ClientLevel, DistributedClientLevel, DPPolicy, SiteProtected
from server.exchange import Exchange, ReplyTimeout
from server.federation import Federation, FederationState, initial_state
from server.held_out import federated_split
from server.optimizer_state import restore_optimizer_state
from server.plots import plot_run
from server.pretraining import pretrain
from server.reply_checks import ReplyChecker
from server.run_config import RunConfig
from server.run_outcome import end_run
from server.rundir import RunDirectory, write_json_atomic, write_torch_atomic
from server.secure_aggregation_plan import run_parameters
from server.secure_collect import SecureCollect
from server.site_book import SiteBook, write_key_history
from server.strategies import STRATEGIES, build_strategy, sample_size
from server.summary import summarize

# Its lines travel to whoever runs `flwr run --stream` or `flwr log`: never coloured.
readable_flower_logs(relayed=True)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    run = RunConfig.from_flower(context.run_config)
    run_dir = _run_directory(run)
    split = federated_split(run.data)
    torch.manual_seed(run.data.seed)
    model = build_model(run.training.model, split.input_shape, split.num_classes)
    if run.pretrains:
        pretrain(model, run.pretraining, split.input_shape, split.num_classes, run.data.seed)

    def evaluate_centrally(arrays: ArrayRecord) -> Evaluation:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, split.test, torch.device("cpu"))

    num_sites = len(list(grid.get_node_ids()))
    state = initial_state(run, run_dir, model)
    log(INFO, "Cohort run directory: %s", run_dir.path)
    sampled = sample_size(run.aggregation, num_sites)
    try:
        book = SiteBook.for_run(run)
        state.registry.attach(book, context.run_id)
        write_key_history(book.read(), run_dir.path)
        run.refuse_federation_size(sampled)
        parameters = (
            run_parameters(run, sampled, dimension(ArrayRecord(model.state_dict())))
            if run.dp.secure_aggregation
            else None
        )
    except CohortInputError as unworkable:
        state.stop_reason = f"stopped before round {state.next_round}: {unworkable}"
        _finish(run, run_dir, state, time.monotonic() - started)
        return
    strategy = build_strategy(run, num_sites)
    restore_optimizer_state(strategy, state.optimizer)
    exchange = Exchange(grid, ReplyTimeout(run.checks.reply_timeout), state.registry)
    checker = ReplyChecker(run, context.run_id, state.registry)
    policy: DPPolicy = SiteProtected(run, strategy)
    collect: CollectStage
    if parameters is not None:
        if run.dp.mechanism.distributed_noise:
            policy = DistributedClientLevel(
                run, strategy, DistributedPrivacy.for_run(run, run_dir.path, parameters, context.run_id)
            )
        collect = SecureCollect(run, strategy, exchange, checker, parameters, context.run_id)
    else:
        if run.dp.client_level:
            central = CentralPrivacy.for_run(run, run_dir.path, sampled, context.run_id)
            strategy = wrap_with_central_dp(
                strategy,
                run,
                central.noise,
                central.sample_size,
                resume_clip_norm=central.last_clip_norm(),
                noise_sources=coordinator_noise(run),
            )
            policy = ClientLevel(run, strategy, central)
        collect = PlainCollect(
            run, strategy, exchange, checker, policy.norm_limit, AuditTranscript.for_run(run.data, run_dir.path)
        )
    require_compatible(collect, STRATEGIES[run.aggregation.strategy])
    federation = Federation(grid, run, run_dir, strategy, policy, collect, exchange, checker, evaluate_centrally)
    _finish(run, run_dir, federation.run_rounds(state), time.monotonic() - started)


def _run_directory(run: RunConfig) -> RunDirectory:
    """A resumed run continues in its own directory; a new one gets a fresh directory."""
    if run.resume_from:
        return RunDirectory(Path(run.resume_from).resolve())
    run_dir = RunDirectory.for_new_run(run)
    run_dir.prepare(run)
    return run_dir


def _finish(run: RunConfig, run_dir: RunDirectory, state: FederationState, wall_seconds: float) -> None:
    write_torch_atomic(run_dir.model_file, state.arrays.to_torch_state_dict())
    metrics = run_dir.read_metrics()
    if metrics:
        plot_run(metrics, run_dir.plot_dir)
    write_json_atomic(
        run_dir.summary_file,
        summarize(metrics, wall_seconds, state.stop_reason, canary_client_names(run.data)).to_json(),
    )
    end_run(state.stop_reason)
