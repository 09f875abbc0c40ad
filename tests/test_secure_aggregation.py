"""Secure aggregation (SecAgg+) run in-process: the coordinator's four stages against the
sites' four stages, with real keys, shares, ciphertexts and masks, and the transport
between them replaced by direct calls. Sites drop out, refuse, or misbehave at each stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.integer_update import clipped, integer_update
from client.secure_aggregation import STATE, key_stage_reply, masked_input_reply
from common.privacy.noise import SecureNoise
from common.secure_aggregation import field as modular
from common.secure_aggregation.messages import MASKED_INPUT, MASKED_VECTOR, RECORD, REFUSED, Stage, masked_input_record
from common.secure_aggregation.parameters import SecAggParameters, default_threshold
from server.secure_aggregation import Abandoned, SecureAggregationRound, UnmaskedSum, neighbour_graph

RUN_ID = 7
DIMENSION = 300
CLIP = 1.0

# Rewrites a message on its way (a coordinator or network that tampers).
Tamper = Callable[[Message, Stage], Message]


ENCODE = partial(integer_update, source=SecureNoise())


def respond(message: Message, context: Context, name: str, contribute: Callable) -> Message:
    """A site's reply to any stage, as the ClientApp gives it."""
    return key_stage_reply(message, context, name) or masked_input_reply(message, context, name, contribute)


@dataclass
class Sites:
    """Sites answering the coordinator's messages by calling their stages directly."""

    updates: dict[int, np.ndarray]
    drop_at: dict[int, Stage] = field(default_factory=dict)
    tamper: Tamper | None = None
    contexts: dict[int, Context] = field(init=False)
    seen_by_coordinator: list[Message] = field(default_factory=list)
    errors: dict[int, tuple[Stage, int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.contexts = {node: Context(RUN_ID, node, {}, RecordDict(), {}) for node in self.updates}

    def exchange(self, messages: list[Message], stage: Stage) -> list[tuple[int, Message]]:
        replies = []
        for sent in messages:
            node = sent.metadata.dst_node_id
            if self.drop_at.get(node) == stage:
                continue
            message = sent if self.tamper is None else self.tamper(sent, stage)
            reply = respond(message, self.contexts[node], f"site-{node}", self._contribution(message, node))
            self.seen_by_coordinator.append(reply)
            if reply.has_error():  # the exchange reports an error reply; the protocol sees no answer
                self.errors[node] = (stage, reply.error.code, reply.error.reason)
            else:
                replies.append((node, reply))
        return replies

    def _contribution(self, message: Message, node: int) -> Callable:
        def contribute(masker: Callable[[np.ndarray], np.ndarray]) -> Message:
            return Message(
                RecordDict({MASKED_INPUT: masked_input_record(masker(self.updates[node], ENCODE))}), reply_to=message
            )

        return contribute


def parameters(
    sites: int,
    neighbours: int | None = None,
    threshold: int | None = None,
    noise: float = 0.0,
    min_contributions: int = 2,
) -> SecAggParameters:
    k = sites - 1 if neighbours is None else neighbours
    return SecAggParameters(sites, k, threshold or default_threshold(k), 32, CLIP, DIMENSION, noise, min_contributions)


def updates(count: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Node ids far apart (as Flower's are), updates of norm about 0.6: some clipped, most not."""
    rng = np.random.default_rng(seed)
    return {
        1000 + 37 * i: rng.normal(0, 0.6 / np.sqrt(DIMENSION), DIMENSION) * rng.uniform(0.5, 3.0) for i in range(count)
    }


def run_round(
    sites: Sites, params: SecAggParameters, accept=lambda node, reply: None
) -> tuple[SecureAggregationRound, UnmaskedSum | Abandoned]:
    protocol = SecureAggregationRound(params, RUN_ID, 3, sorted(sites.updates))
    return protocol, protocol.run(sites.exchange, RecordDict(), accept)


def plain_sum(sites: Sites, contributors) -> np.ndarray:
    return sum(clipped(sites.updates[node], CLIP) for node in contributors)


def assert_sum_of(result, sites: Sites, contributors) -> None:
    assert isinstance(result, UnmaskedSum), result
    assert result.contributors == tuple(sorted(contributors))
    bound = len(contributors) / result_scale(sites)  # each site's rounding moves a coordinate by less than 1 / scale
    assert np.abs(result.total - plain_sum(sites, contributors)).max() < bound


def result_scale(sites: Sites) -> float:
    return parameters(len(sites.updates)).scale


@pytest.fixture(autouse=True)
def _identity(clientapp_identity):
    yield


def test_unmasked_sum_equals_the_plain_sum_within_quantization_error() -> None:
    sites = Sites(updates(5))
    _, result = run_round(sites, parameters(5))
    assert_sum_of(result, sites, sites.updates)


def test_secagg_plus_ring_of_few_neighbours_unmasks_the_same_sum() -> None:
    sites = Sites(updates(12, seed=1))
    protocol, result = run_round(sites, parameters(12, neighbours=4))
    assert_sum_of(result, sites, sites.updates)
    assert all(len(neighbours) == 4 for neighbours in protocol._graph.values())


def test_coordinator_sees_no_individual_update_in_any_reply() -> None:
    sites = Sites(updates(5))
    run_round(sites, parameters(5))
    masked = [
        reply.content.array_records[MASKED_INPUT][MASKED_VECTOR].numpy()
        for reply in sites.seen_by_coordinator
        if MASKED_INPUT in reply.content.array_records
    ]
    assert len(masked) == 5
    scale = parameters(5).scale
    for vector in masked:  # as an update, each masked input is uniform noise far beyond any clipped update
        assert np.linalg.norm(modular.from_field(vector, 32) / scale) > 1000 * CLIP


def test_site_secrets_live_in_its_context_state_until_unmask_and_never_leave_it() -> None:
    sites = Sites(updates(4))
    held = {}

    def watch(message: Message, stage: Stage) -> Message:
        if stage == Stage.UNMASK:
            node = message.metadata.dst_node_id
            held[node] = sites.contexts[node].state.config_records[STATE]
        return message

    sites.tamper = watch
    run_round(sites, parameters(4))
    assert all(STATE not in context.state.config_records for context in sites.contexts.values())
    sent = b"".join(
        bytes(v)
        for reply in sites.seen_by_coordinator
        if reply.has_content()
        for record in reply.content.config_records.values()
        for value in record.values()
        for v in (value if isinstance(value, list) else [value])
        if isinstance(v, bytes)
    )
    for secrets in held.values():
        for name in ("encryption-private", "masking-private", "seed"):
            assert secrets[name] not in sent


@pytest.mark.parametrize("stage", list(Stage))
def test_a_dropout_within_the_threshold_leaves_the_sum_correct(stage: Stage) -> None:
    sites = Sites(updates(6, seed=2))
    dropped = min(sites.updates)
    sites.drop_at = {dropped: stage}
    protocol, result = run_round(sites, parameters(6))
    contributed = {node for node in sites.updates if node != dropped or stage == Stage.UNMASK}
    assert_sum_of(result, sites, contributed)
    assert [(d.node, d.stage) for d in protocol.dropouts] == [(dropped, stage)]


def test_sites_that_drop_between_sharing_and_masked_input_are_unmasked_by_their_neighbours() -> None:
    sites = Sites(updates(12, seed=3))
    gone = sorted(sites.updates)[:2]
    sites.drop_at = dict.fromkeys(gone, Stage.MASKED_INPUT)
    _, result = run_round(sites, parameters(12, neighbours=6, threshold=5))
    assert_sum_of(result, sites, set(sites.updates) - set(gone))


@pytest.mark.parametrize("stage", list(Stage))
def test_dropouts_beyond_the_threshold_abandon_the_round_with_one_reason(stage: Stage) -> None:
    sites = Sites(updates(6, seed=4))
    params = parameters(6)  # k = 5, t = 4: three dropouts leave three holders
    sites.drop_at = dict.fromkeys(sorted(sites.updates)[:3], stage)
    _, result = run_round(sites, params)
    assert isinstance(result, Abandoned) and result.stage == stage
    assert result.reason and "\n" not in result.reason


def test_fewer_inputs_than_the_noise_is_sized_for_abandon_the_round_before_unmasking() -> None:
    sites = Sites(updates(6, seed=6))
    sites.drop_at = {min(sites.updates): Stage.MASKED_INPUT}
    _, result = run_round(sites, parameters(6, min_contributions=6))
    assert isinstance(result, Abandoned) and result.stage == Stage.MASKED_INPUT
    assert "fewer than the 6" in result.reason


def test_a_tampered_share_ciphertext_is_refused_by_its_receiver() -> None:
    sites = Sites(updates(6, seed=7))
    victim = max(sites.updates)

    def flip(message: Message, stage: Stage) -> Message:
        if stage == Stage.MASKED_INPUT and message.metadata.dst_node_id == victim:
            record = message.content.config_records[RECORD]
            ciphertexts = list(record["ciphertexts"])
            ciphertexts[0] = ciphertexts[0][:-1] + bytes([ciphertexts[0][-1] ^ 1])
            record["ciphertexts"] = ciphertexts
        return message

    sites.tamper = flip
    protocol, result = run_round(sites, parameters(6))
    ((node, (stage, code, reason)),) = sites.errors.items()
    assert (node, stage, code) == (victim, Stage.MASKED_INPUT, REFUSED)
    assert "do not authenticate" in reason
    assert [(d.node, d.stage, d.violation) for d in protocol.dropouts] == [(victim, Stage.MASKED_INPUT, False)]
    assert_sum_of(result, sites, set(sites.updates) - {victim})


def test_a_share_ciphertext_delivered_to_another_site_does_not_open() -> None:
    sites = Sites(updates(6, seed=8))
    first, second = sorted(sites.updates)[-2:]

    def redirect(message: Message, stage: Stage) -> Message:
        if stage == Stage.MASKED_INPUT and message.metadata.dst_node_id == second:
            record = message.content.config_records[RECORD]
            senders = list(record["senders"])
            senders[senders.index(first)], senders[0] = senders[0], senders[senders.index(first)]
            record["senders"] = senders
        return message

    sites.tamper = redirect
    run_round(sites, parameters(6))
    assert {node: code for node, (_, code, _) in sites.errors.items()} == {second: REFUSED}


def test_a_site_refuses_to_reveal_the_shares_of_its_own_input() -> None:
    sites = Sites(updates(5, seed=9))
    target = min(sites.updates)

    def claim_dropped(message: Message, stage: Stage) -> Message:
        if stage == Stage.UNMASK and message.metadata.dst_node_id == target:
            record = message.content.config_records[RECORD]
            record["survivors"] = [n for n in record["survivors"] if n != target]
            record["dropped"] = sorted([*record["dropped"], target])
        return message

    sites.tamper = claim_dropped
    run_round(sites, parameters(5))
    assert {node: (stage, code) for node, (stage, code, _) in sites.errors.items()} == {target: (Stage.UNMASK, REFUSED)}


def test_a_site_answers_one_unmask_request_per_round() -> None:
    sites = Sites(updates(4, seed=10))
    requests: list[Message] = []

    def keep(message: Message, stage: Stage) -> Message:
        if stage == Stage.UNMASK:
            requests.append(message)
        return message

    sites.tamper = keep
    run_round(sites, parameters(4))
    again = requests[0]
    reply = respond(again, sites.contexts[again.metadata.dst_node_id], "again", lambda masker: again)
    assert reply.has_error() and reply.error.code == REFUSED and "out of order" in reply.error.reason


def test_stages_out_of_order_are_refused() -> None:
    sites = Sites(updates(3, seed=11))
    node = min(sites.updates)
    request = Message(
        RecordDict({RECORD: ConfigRecord({"stage": "unmask", "round": 3, "survivors": [node], "dropped": []})}),
        dst_node_id=node,
        message_type="train",
    )
    reply = respond(request, sites.contexts[node], "s", lambda masker: request)
    assert reply.has_error() and reply.error.code == REFUSED


def test_a_share_that_does_not_rebuild_the_committed_seed_abandons_the_round() -> None:
    sites = Sites(updates(5, seed=12))
    liar = min(sites.updates)
    original = sites.exchange

    def corrupt(messages: list[Message], stage: Stage) -> list[tuple[int, Message]]:
        replies = original(messages, stage)
        if stage == Stage.UNMASK:
            for node, reply in replies:
                if node == liar:
                    record = reply.content.config_records[RECORD]
                    record["shares"] = [share[:-1] + bytes([share[-1] ^ 0xFF]) for share in record["shares"]]
        return replies

    sites.exchange = corrupt  # type: ignore[method-assign]
    _, result = run_round(sites, parameters(5, threshold=5))
    assert isinstance(result, Abandoned) and result.stage == Stage.UNMASK
    assert "do not rebuild" in result.reason


def test_an_unclipped_input_puts_the_sum_outside_its_bound_and_abandons_the_round() -> None:
    sites = Sites(updates(4, seed=13))
    cheat = min(sites.updates)
    params = parameters(4)

    def contribute_unclipped(message: Message, node: int):
        def contribute(masker):
            masked = masker(np.zeros(DIMENSION), ENCODE)
            boost = modular.to_field(np.full(DIMENSION, int(params.coordinate_bound(4))), 32)
            return Message(
                RecordDict(
                    {
                        MASKED_INPUT: masked_input_record(
                            modular.add(masked.astype(np.uint64), boost, 32).astype(masked.dtype)
                        )
                    }
                ),
                reply_to=message,
            )

        return contribute if node == cheat else Sites._contribution(sites, message, node)

    sites._contribution = contribute_unclipped  # type: ignore[method-assign]
    _, result = run_round(sites, params)
    assert isinstance(result, Abandoned) and "outside the bound" in result.reason


def test_a_contribution_the_coordinator_does_not_accept_is_unmasked_as_a_dropout() -> None:
    sites = Sites(updates(6, seed=14))
    rejected = max(sites.updates)
    protocol, result = run_round(
        sites,
        parameters(6),
        accept=lambda node, reply: "its ledger entry does not verify" if node == rejected else None,
    )
    assert_sum_of(result, sites, set(sites.updates) - {rejected})
    assert [(d.node, d.reason) for d in protocol.dropouts] == [(rejected, "its ledger entry does not verify")]


def test_each_contributors_noise_share_is_in_the_sum_and_a_dropped_sites_is_not() -> None:
    sites = Sites({node: np.zeros(DIMENSION * 10) for node in updates(5, seed=15)})
    params = SecAggParameters(5, 4, 3, 32, CLIP, DIMENSION * 10, noise_variance=4.0e6, min_contributions=2)
    sites.drop_at = {min(sites.updates): Stage.MASKED_INPUT}
    _, result = run_round(sites, params)
    assert isinstance(result, UnmaskedSum) and result.noise_variance == 4 * 4.0e6
    integer_noise = result.total * params.scale
    assert np.var(integer_noise) == pytest.approx(4 * 4.0e6, rel=0.1)


def test_neighbour_graph_is_a_symmetric_ring_of_k_neighbours() -> None:
    graph = neighbour_graph(list(range(20)), 6)
    assert all(len(neighbours) == 6 and node not in neighbours for node, neighbours in graph.items())
    assert all(node in graph[other] for node, neighbours in graph.items() for other in neighbours)
    assert neighbour_graph(list(range(5)), 4) == {n: frozenset(range(5)) - {n} for n in range(5)}
