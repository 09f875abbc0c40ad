"""What an accepted update weighs, which norms pass, which robust strategies can be chosen,
and the server optimizer's state across a checkpoint: on real Flower strategies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.task_identity import TaskIdentity

from common import protocol
from common.config import DPConfig
from common.errors import CohortInputError
from common.privacy.ledger import LedgerEntry, LedgerRecord
from server.aggregation_weight import rewrite_for_aggregation, weights_for
from server.checkpoint import Checkpoint
from server.client_level_noise import client_level_noise
from server.dp_policy import SiteProtected
from server.optimizer_state import optimizer_state, restore_optimizer_state
from server.reply_checks import Update
from server.run_config import AggregationConfig, CentralDPConfig, ChecksConfig, RunConfig
from server.strategies import AGGREGATION_WEIGHT, build_strategy


@pytest.fixture(autouse=True)
def serverapp_identity() -> Iterator[None]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _reply(node: int, value: float, examples: float | None = 100) -> Message:
    arrays = ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})
    metrics = MetricRecord({"num-examples": examples} if examples is not None else {})
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=instruction)


def _update(node: int, value: float, examples: int | None = 100) -> Update:
    reply = _reply(node, value, examples)
    entry = LedgerEntry(
        0,
        "0" * 64,
        LedgerRecord(
            "release", 1, 1, f"site-{node}", "m", 1.0, 0.1, "poisson", 1, 1.0, 1e-5, 0.1, "rdp", 8.0, "", "", ""
        ),
        "",
    )
    return Update(reply, node, f"site-{node}", reply.content[protocol.ARRAYS], abs(value) * 3**0.5, entry, examples)


def _fedavg(updates: list[Update], checks: ChecksConfig) -> float:
    rewrite_for_aggregation(updates, RunConfig(checks=checks))
    arrays, _ = FedAvg(weighted_by_key=AGGREGATION_WEIGHT).aggregate_train(1, [u.reply for u in updates])
    assert arrays is not None
    return float(arrays["w"].numpy()[0])


def test_by_default_a_site_claiming_a_trillion_examples_weighs_as_much_as_any_other() -> None:
    updates = [_update(1, 1.0), _update(2, 1.0), _update(3, 10.0, examples=10**12)]
    assert _fedavg(updates, ChecksConfig()) == pytest.approx(4.0)


def test_example_weights_are_capped_at_the_rounds_median_count() -> None:
    updates = [_update(1, 0.0, 50), _update(2, 0.0, 100), _update(3, 0.0, 10**12)]
    assert weights_for(updates, ChecksConfig(aggregation_weight="examples")) == [50.0, 100.0, 100.0]


def test_example_weights_are_capped_at_the_configured_cap() -> None:
    updates = [_update(1, 0.0, 50), _update(2, 0.0, 10**12)]
    assert weights_for(updates, ChecksConfig(aggregation_weight="examples", example_cap=80)) == [50.0, 80.0]


def test_a_site_that_withholds_its_count_weighs_as_the_cap() -> None:
    updates = [_update(1, 0.0, 50), _update(2, 0.0, None)]
    assert weights_for(updates, ChecksConfig(aggregation_weight="examples", example_cap=80)) == [50.0, 80.0]


def test_the_strategy_sees_only_the_arrays_and_the_servers_weight() -> None:
    updates = [_update(1, 1.0)]
    rewrite_for_aggregation(updates, RunConfig())
    assert dict(updates[0].reply.content[protocol.METRICS]) == {AGGREGATION_WEIGHT: 1.0}


def test_a_site_that_withholds_its_training_metrics_is_aggregated_with_those_that_send_them() -> None:
    reporting, withholding = _update(1, 1.0), _update(2, 3.0)
    reporting.metrics = {"train_loss": 0.5, "train_accuracy": 0.9}
    assert _fedavg([reporting, withholding], ChecksConfig()) == pytest.approx(2.0)


def test_q_fedavg_sees_each_sites_checked_training_loss() -> None:
    update = _update(1, 1.0)
    update.metrics = {"train_loss": 0.5}
    rewrite_for_aggregation([update], RunConfig(aggregation=AggregationConfig(strategy="qfedavg")))
    assert dict(update.reply.content[protocol.METRICS]) == {AGGREGATION_WEIGHT: 1.0, protocol.TRAIN_LOSS: 0.5}


def test_default_norm_bound_is_a_multiple_of_the_rounds_median_norm() -> None:
    policy = SiteProtected(RunConfig(checks=ChecksConfig(update_norm_factor=4.0)), FedAvg())
    assert policy.norm_limit([1.0, 1.2, 100.0]) == pytest.approx(4.8)
    assert policy.norm_limit([1.0, 100.0]) == pytest.approx(4.0)  # the lower median: one booster of two cannot raise it


def test_configured_norm_bound_overrides_the_default() -> None:
    assert SiteProtected(RunConfig(checks=ChecksConfig(update_norm_bound=2.5)), FedAvg()).norm_limit([1.0, 1.0]) == 2.5


def test_client_level_dp_with_client_side_clipping_bounds_updates_by_the_clipping_norm() -> None:
    from server.central_dp import CentralPrivacy, wrap_with_central_dp
    from server.dp_policy import ClientLevel

    run = RunConfig(
        dp=DPConfig(dp_level="client", clip_norm=0.7, noise_multiplier=1.0),
        central_dp=CentralDPConfig(clipping_side="client"),
    )
    noise = client_level_noise(run.dp, run.central_dp, run.training.rounds, 5)
    strategy = wrap_with_central_dp(build_strategy(run, 5), run, noise, 5)
    policy = ClientLevel(run, strategy, CentralPrivacy.__new__(CentralPrivacy))
    assert policy.norm_limit([0.1]) == pytest.approx(0.7 * 1.001)


@pytest.mark.parametrize(
    ("strategy", "hostile", "sites", "needed"),
    [("bulyan", 2, 10, 11), ("krum", 2, 6, 7), ("multikrum", 1, 4, 5)],
)
def test_a_federation_too_small_for_the_robust_strategy_is_refused(
    strategy: str, hostile: int, sites: int, needed: int
) -> None:
    run = RunConfig(aggregation=AggregationConfig(strategy=strategy, byzantine_sites=hostile))
    with pytest.raises(CohortInputError, match=f"needs at least {needed} sites"):
        run.refuse_federation_size(sites)
    run.refuse_federation_size(needed)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_client_level_dp_refuses_every_robust_strategy(strategy: str) -> None:
    with pytest.raises(CohortInputError, match="plain mean"):
        RunConfig(aggregation=AggregationConfig(strategy=strategy), dp=DPConfig(dp_level="client"))


def test_client_level_dp_refuses_example_weights() -> None:
    with pytest.raises(CohortInputError, match="equal shares"):
        RunConfig(dp=DPConfig(dp_level="client"), checks=ChecksConfig(aggregation_weight="examples"))


def test_trimmed_beta_of_half_or_more_is_refused() -> None:
    with pytest.raises(CohortInputError, match="trimmed-beta"):
        AggregationConfig(strategy="fedtrimmedavg", trimmed_beta=0.5).validate()


def _configure(strategy: Strategy, arrays: ArrayRecord) -> None:
    """What configure_train does to a server optimizer (the rest of it samples a Grid)."""
    if isinstance(strategy, FedOpt):
        strategy.current_arrays = {k: a.numpy() for k, a in arrays.items()}
    elif isinstance(strategy, FedAvgM) and strategy.current_arrays is None:
        strategy.current_arrays = arrays


def _round(strategy: Strategy, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
    _configure(strategy, arrays)
    rng = np.random.default_rng(server_round)
    replies = []
    for node in (1, 2, 3):
        update = ArrayRecord(
            {k: Array(a.numpy() + rng.normal(size=a.numpy().shape).astype(np.float32)) for k, a in arrays.items()}
        )
        instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
        replies.append(
            Message(
                content=RecordDict({"arrays": update, "metrics": MetricRecord({AGGREGATION_WEIGHT: 1.0})}),
                reply_to=instruction,
            )
        )
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return aggregated


def _resumed_after_round_one(run: RunConfig, start: ArrayRecord, tmp_path: Path, restore: bool) -> ArrayRecord:
    first = build_strategy(run, 3)
    after_one = _round(first, start, 1)
    Checkpoint(1, after_one.to_torch_state_dict(), run.fingerprint(), "{}", optimizer_state(first), "{}").save(tmp_path)
    saved = Checkpoint.load(tmp_path / "round-0001.pt")
    resumed = build_strategy(run, 3)
    if restore:
        restore_optimizer_state(resumed, saved.optimizer)
    arrays = ArrayRecord(saved.weights)
    for server_round in (2, 3):
        arrays = _round(resumed, arrays, server_round)
    return arrays


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_a_resumed_server_optimizer_continues_exactly_where_it_stopped(name: str, tmp_path: Path) -> None:
    run = RunConfig(aggregation=AggregationConfig(strategy=name), dp=DPConfig(enabled=False))
    start = ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32)), "b": Array(np.ones(3, dtype=np.float32))})
    uninterrupted = build_strategy(run, 3)
    arrays = start
    for server_round in (1, 2, 3):
        arrays = _round(uninterrupted, arrays, server_round)
    resumed = _resumed_after_round_one(run, start, tmp_path, restore=True)
    restarted = _resumed_after_round_one(run, start, tmp_path, restore=False)
    for key in ("w", "b"):
        np.testing.assert_array_equal(resumed[key].numpy(), arrays[key].numpy())
    assert any(not np.array_equal(restarted[key].numpy(), arrays[key].numpy()) for key in ("w", "b")), (
        "the state did not matter"
    )


def test_the_clipping_bit_client_side_adaptive_clipping_counts_reaches_the_strategy() -> None:
    from flwr.supercore.differential_privacy import KEY_NORM_BIT

    update = _update(1, 1.0)
    update.norm_bit = 1
    rewrite_for_aggregation([update], RunConfig())
    assert dict(update.reply.content[protocol.METRICS]) == {AGGREGATION_WEIGHT: 1.0, KEY_NORM_BIT: 1}
