"""The coordinator's side of a secure aggregation round (SecAgg+, Bell et al. CCS 2020;
with k = n - 1 neighbours, SecAgg of Bonawitz et al. CCS 2017): it relays keys and
encrypted shares between the sites, sums their masked inputs, and removes the masks with
the shares the surviving sites reveal. It never holds a site's unmasked input, nor a key
that would unmask one.

The sets of a round: U1 advertised keys, U2 shared its secrets, U3 sent a masked input,
U4 revealed shares. Each stage is one exchange; a site that does not answer in time,
answers with an error, or answers against the protocol drops out of the round (a
`Dropout` says at which stage and why; the exchange itself reports silence and error
replies, so only a violation is the protocol's to report). Masks are removed for:
- each site in U3: its mask seed, rebuilt from `threshold` shares and checked against the
  commitment it made at stage 2;
- each site in U2 but not in U3 (it shared, then dropped): the pairwise masks its
  neighbours in U3 added against it, from its masking key, rebuilt and checked against
  its advertised public key.
A site that dropped before sharing was never masked against. The round is abandoned, with
one reason, as soon as it cannot end in a correct sum: fewer inputs than the parameters'
`min_contributions`, a neighbourhood left with fewer than `threshold` share holders, a
secret that does not rebuild, or a sum outside the bound honest inputs keep.

Adversary model: an honest-but-curious coordinator (it follows the protocol and tries to
learn from what it sees) and sites that do not collude with it. See docs/site.md for what
this does and does not protect against.
"""

from __future__ import annotations

import secrets as system_random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common.secure_aggregation import crypto
from common.secure_aggregation import field as modular
from common.secure_aggregation.messages import (
    MASKED_INPUT,
    MASKED_VECTOR,
    RECORD,
    AdvertiseKeys,
    EncryptedShares,
    ForwardedShares,
    ProtocolViolation,
    PublicKeys,
    RevealedShares,
    ShareKeys,
    Stage,
    Unmask,
)
from common.secure_aggregation.parameters import SecAggParameters

# Sends one stage's messages and returns the replies with content that came back in time,
# each with the node the message was sent to (silence and error replies are the exchange's
# to report: server.exchange).
Exchange = Callable[[list[Message], Stage], list[tuple[int, Message]]]
# Decides whether a site's masked-input reply may count (its ledger entry verified, say):
# None, or why not.
AcceptContribution = Callable[[int, Message], str | None]
Graph = dict[int, frozenset[int]]


@dataclass(frozen=True)
class Dropout:
    """A site that left the round, the stage it left at, and why.

    violation: it answered, against the protocol or with a contribution that was not
    accepted; otherwise it sent nothing with content in time (the exchange knows why)."""

    node: int
    stage: Stage
    reason: str
    violation: bool = True


@dataclass(frozen=True)
class UnmaskedSum:
    """An unmasked round: the sum of the contributing sites' clipped updates (float64, flat,
    in the global model's order), their Skellam noise included, over `scale`."""

    total: np.ndarray
    contributors: tuple[int, ...]
    noise_variance: float


@dataclass(frozen=True)
class Abandoned:
    """A round that could not be unmasked correctly; the global model stays."""

    stage: Stage
    reason: str


@dataclass
class SecureAggregationRound:
    """One round of the protocol for the sites in `nodes`."""

    parameters: SecAggParameters
    run_id: int
    server_round: int
    nodes: list[int]
    dropouts: list[Dropout] = field(default_factory=list)
    _public_keys: dict[int, PublicKeys] = field(default_factory=dict)
    _graph: Graph = field(default_factory=dict)
    _shares_to: dict[int, dict[int, bytes]] = field(default_factory=dict)
    _commitments: dict[int, bytes] = field(default_factory=dict)

    def run(self, exchange: Exchange, training: RecordDict, accept: AcceptContribution) -> UnmaskedSum | Abandoned:
        """All four stages; `training` is the content a plain training request carries."""
        shared = self._advertise_and_share(exchange)
        if isinstance(shared, Abandoned):
            return shared
        masked = self._collect_masked_inputs(exchange, shared, training, accept)
        if isinstance(masked, Abandoned):
            return masked
        survivors, masked_sum = masked
        return self._unmask(exchange, shared, survivors, masked_sum)

    def _advertise_and_share(self, exchange: Exchange) -> set[int] | Abandoned:
        """Stages 1 and 2: U2, the sites whose shares reach their whole neighbourhood."""
        request = AdvertiseKeys(self.server_round, self.parameters).to_record()
        for node, record in self._answers(exchange, Stage.ADVERTISE_KEYS, dict.fromkeys(self.nodes, request)).items():
            try:
                self._public_keys[node] = PublicKeys.from_record(record)
            except ProtocolViolation as violation:
                self._drop(node, Stage.ADVERTISE_KEYS, f"sent keys that {violation}")
        self._drop_reused_keys()
        advertised = set(self._public_keys)
        problem = self._too_few(advertised, Stage.ADVERTISE_KEYS)
        if problem:
            return problem
        self._graph = neighbour_graph(sorted(advertised), self.parameters.neighbours)
        requests = {node: self._share_keys_request(node) for node in sorted(advertised)}
        for node, record in self._answers(exchange, Stage.SHARE_KEYS, requests).items():
            try:
                shares = EncryptedShares.from_record(record)
            except ProtocolViolation as violation:
                self._drop(node, Stage.SHARE_KEYS, f"sent shares that {violation}")
                continue
            if set(shares.receivers) != set(self._graph[node]):
                self._drop(node, Stage.SHARE_KEYS, "did not send shares to exactly its neighbours")
                continue
            self._commitments[node] = shares.seed_commitment
            for receiver, ciphertext in zip(shares.receivers, shares.ciphertexts, strict=True):
                self._shares_to.setdefault(receiver, {})[node] = ciphertext
        problem = self._too_few(set(self._commitments), Stage.SHARE_KEYS)
        if problem:
            return problem
        shared = self._rebuildable(set(self._commitments), Stage.SHARE_KEYS)
        if self._too_few(shared, Stage.SHARE_KEYS):
            return Abandoned(
                Stage.SHARE_KEYS,
                f"{len(self._commitments)} sites shared their secrets, but only {len(shared)} of them with "
                f"{self.parameters.threshold} holders each; the round needs more",
            )
        return shared

    def _collect_masked_inputs(
        self, exchange: Exchange, shared: set[int], training: RecordDict, accept: AcceptContribution
    ) -> tuple[set[int], np.ndarray] | Abandoned:
        """Stage 3: each site in U2 gets the shares addressed to it by the others in U2 and
        the training request, and answers with its masked input."""
        requests = {}
        for node in sorted(shared):
            senders = sorted(sender for sender in self._shares_to.get(node, {}) if sender in shared)
            forwarded = ForwardedShares(
                self.server_round, tuple(senders), tuple(self._shares_to[node][s] for s in senders)
            )
            requests[node] = forwarded.to_record()
        masked_sum = np.zeros(self.parameters.dimension, dtype=np.uint64)
        survivors = set()
        for node, reply in self._replies(exchange, Stage.MASKED_INPUT, requests, training):
            problem = _masked_input_problem(reply, self.parameters) or accept(node, reply)
            if problem:
                self._drop(node, Stage.MASKED_INPUT, problem)
                continue
            vector = reply.content.array_records[MASKED_INPUT][MASKED_VECTOR].numpy()
            masked_sum = modular.add(masked_sum, vector.astype(np.uint64), self.parameters.bits)
            survivors.add(node)
        abandoned = (
            self._too_few(survivors, Stage.MASKED_INPUT)
            or self._split(survivors)
            or self._unrebuildable(shared, survivors)
        )
        return abandoned or (survivors, masked_sum)

    def _unmask(
        self, exchange: Exchange, shared: set[int], survivors: set[int], masked_sum: np.ndarray
    ) -> UnmaskedSum | Abandoned:
        """Stage 4: collect one share per neighbour from each survivor, rebuild, remove masks."""
        dropped = shared - survivors
        asked = {}
        for node in sorted(survivors):
            neighbourhood = self._graph[node] | {node}
            asked[node] = Unmask(
                self.server_round, tuple(sorted(neighbourhood & survivors)), tuple(sorted(neighbourhood & dropped))
            )
        shares: dict[int, list[bytes]] = {node: [] for node in shared}
        for node, record in self._answers(
            exchange, Stage.UNMASK, {node: request.to_record() for node, request in asked.items()}
        ).items():
            try:
                revealed = RevealedShares.from_record(record)
            except ProtocolViolation as violation:
                self._drop(node, Stage.UNMASK, f"revealed shares that {violation}")
                continue
            if revealed.owners != asked[node].survivors + asked[node].dropped:
                self._drop(node, Stage.UNMASK, "revealed shares of other sites than it was asked for")
                continue
            for owner, share in zip(revealed.owners, revealed.shares, strict=True):
                shares[owner].append(share)
        bits, length = self.parameters.bits, self.parameters.dimension
        total = masked_sum
        for owner in sorted(shared):
            secret = self._rebuilt(owner, shares[owner], alive=owner in survivors)
            if isinstance(secret, Abandoned):
                return secret
            if owner in survivors:
                total = modular.subtract(total, modular.keystream_mask(secret, length, bits), bits)
                continue
            for neighbour in sorted(self._graph[owner] & survivors):
                key = crypto.agreed_key(
                    secret,
                    self._public_keys[neighbour].masking_key,
                    crypto.PAIRWISE_MASK,
                    self.run_id,
                    self.server_round,
                )
                pairwise = modular.keystream_mask(key, length, bits)
                total = (
                    modular.subtract(total, pairwise, bits) if neighbour < owner else modular.add(total, pairwise, bits)
                )
        return self._checked_sum(modular.from_field(total, bits), survivors)

    def _rebuilt(self, owner: int, shares: list[bytes], alive: bool) -> bytes | Abandoned:
        """The mask seed (alive) or masking key (dropped) of `owner`, checked."""
        threshold = self.parameters.threshold
        what = "mask seed" if alive else "masking key"
        if len(shares) < threshold:
            return Abandoned(
                Stage.UNMASK,
                f"only {len(shares)} shares of node {owner}'s {what} arrived, {threshold} are needed to unmask the sum",
            )
        try:
            secret = crypto.combine_secret(shares[:threshold])
        except ValueError:
            secret = b""
        if alive and crypto.commitment(secret) != self._commitments[owner]:
            return Abandoned(
                Stage.UNMASK, f"the shares of node {owner}'s mask seed do not rebuild the seed it committed to"
            )
        if not alive and (
            len(secret) != crypto.KEY_BYTES or crypto.public_key(secret) != self._public_keys[owner].masking_key
        ):
            return Abandoned(
                Stage.UNMASK, f"the shares of node {owner}'s masking key do not rebuild the key it advertised"
            )
        return secret

    def _checked_sum(self, integers: np.ndarray, survivors: set[int]) -> UnmaskedSum | Abandoned:
        """The sum, once it lies within what the survivors' honest inputs can reach."""
        count = len(survivors)
        largest, norm = float(np.abs(integers).max()), float(np.linalg.norm(integers.astype(np.float64)))
        if largest > self.parameters.coordinate_bound(count) or norm > self.parameters.norm_bound(count):
            return Abandoned(
                Stage.UNMASK,
                f"the unmasked sum of {count} inputs lies outside the bound their clipping implies (a site sent an "
                "input it did not clip, or a share that does not match)",
            )
        return UnmaskedSum(
            integers.astype(np.float64) / self.parameters.scale,
            tuple(sorted(survivors)),
            count * self.parameters.noise_variance,
        )

    def _share_keys_request(self, node: int) -> ConfigRecord:
        holders = sorted(self._graph[node] | {node})
        keys = [self._public_keys[holder] for holder in holders]
        return ShareKeys(
            self.server_round, tuple(holders), tuple(k.encryption_key for k in keys), tuple(k.masking_key for k in keys)
        ).to_record()

    def _rebuildable(self, shared: set[int], stage: Stage) -> set[int]:
        """Sites in `shared` whose secrets still have `threshold` holders in `shared`; a
        site without them is left out (no one masks against it), which can leave others
        short, so repeat until none is."""
        while True:
            short = {node for node in shared if len((self._graph[node] | {node}) & shared) < self.parameters.threshold}
            if not short:
                return shared
            for node in sorted(short):
                self._drop(
                    node, stage, f"fewer than {self.parameters.threshold} of its neighbourhood shared their secrets"
                )
            shared = shared - short

    def _unrebuildable(self, shared: set[int], survivors: set[int]) -> Abandoned | None:
        """Only survivors reveal shares: every site in U2 needs `threshold` of them among its holders."""
        for node in sorted(shared):
            holders = len((self._graph[node] | {node}) & survivors)
            if holders < self.parameters.threshold:
                return Abandoned(
                    Stage.MASKED_INPUT,
                    f"only {holders} of node {node}'s share holders sent their input, fewer than the threshold "
                    f"{self.parameters.threshold}; the round cannot be unmasked",
                )
        return None

    def _too_few(self, remaining: set[int], stage: Stage) -> Abandoned | None:
        needed = max(self.parameters.min_contributions, self.parameters.threshold)
        if len(remaining) >= needed:
            return None
        return Abandoned(
            stage,
            f"{len(remaining)} of {len(self.nodes)} sites remain after "
            f"the {stage} stage, fewer than the {needed} the round needs",
        )

    def _split(self, survivors: set[int]) -> Abandoned | None:
        """An honest coordinator does not unmask a sum whose survivors fall apart into
        groups that share no masks: it could then learn each group's sum on its own."""
        start = min(survivors)
        reached, queue = {start}, deque([start])
        while queue:
            for neighbour in self._graph[queue.popleft()] & survivors - reached:
                reached.add(neighbour)
                queue.append(neighbour)
        if reached == survivors:
            return None
        return Abandoned(
            Stage.MASKED_INPUT,
            f"the {len(survivors)} sites whose inputs arrived are not "
            "all connected by shared masks; the round is not unmasked",
        )

    def _drop_reused_keys(self) -> None:
        """Every site whose public key another site also sent is left out."""
        owners: dict[bytes, list[int]] = {}
        for node, keys in self._public_keys.items():
            for key in (keys.encryption_key, keys.masking_key):
                owners.setdefault(key, []).append(node)
        for node in sorted({node for holders in owners.values() if len(holders) > 1 for node in holders}):
            del self._public_keys[node]
            self._drop(node, Stage.ADVERTISE_KEYS, "sent a public key another site also sent")

    def _answers(self, exchange: Exchange, stage: Stage, requests: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """The protocol records of the stage's replies that came back without error."""
        answers = {}
        for node, reply in self._replies(exchange, stage, requests, RecordDict()):
            record = reply.content.config_records.get(RECORD) if reply.has_content() else None
            if record is None:
                self._drop(node, stage, f"sent no '{RECORD}' record")
            else:
                answers[node] = record
        return answers

    def _replies(
        self, exchange: Exchange, stage: Stage, requests: dict[int, ConfigRecord], content: RecordDict
    ) -> list[tuple[int, Message]]:
        """Send `requests` (each beside `content`); record who failed to answer."""
        messages = [
            Message(
                RecordDict({**content, RECORD: record}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(self.server_round),
            )
            for node, record in requests.items()
        ]
        replies: dict[int, Message] = {}
        for node, reply in exchange(messages, stage):
            if node in requests and reply.has_content():
                replies.setdefault(node, reply)
        for node in sorted(set(requests) - set(replies)):
            self._drop(node, stage, "sent no reply with content in time", violation=False)
        return sorted(replies.items())

    def _drop(self, node: int, stage: Stage, reason: str, violation: bool = True) -> None:
        self.dropouts.append(Dropout(node, stage, reason, violation))


def neighbour_graph(nodes: list[int], neighbours: int) -> Graph:
    """Who shares secrets with whom: the complete graph when `neighbours` covers every
    other site, otherwise the Harary ring of SecAgg+ (each site linked to the neighbours/2
    sites on either side) over a uniformly random order drawn from the system's CSPRNG."""
    if neighbours >= len(nodes) - 1:
        return {node: frozenset(nodes) - {node} for node in nodes}
    order = list(nodes)
    system_random.SystemRandom().shuffle(order)
    half = neighbours // 2
    return {
        node: frozenset(order[(position + offset) % len(order)] for offset in range(-half, half + 1) if offset)
        for position, node in enumerate(order)
    }


def _masked_input_problem(reply: Message, parameters: SecAggParameters) -> str | None:
    """Why a masked-input reply cannot be added to the sum, or None."""
    record = reply.content.array_records.get(MASKED_INPUT)
    if record is None or list(record.keys()) != [MASKED_VECTOR]:
        return f"sent no '{MASKED_INPUT}' ArrayRecord holding one '{MASKED_VECTOR}'"
    try:
        vector = record[MASKED_VECTOR].numpy()
    except Exception as error:  # noqa: BLE001 - any decoding failure of untrusted bytes is a bad reply
        return f"sent a masked input that does not decode ({type(error).__name__})"
    expected = modular.wire_dtype(parameters.bits)
    if vector.dtype != expected or vector.shape != (parameters.dimension,):
        return f"sent a masked input of {vector.dtype}{list(vector.shape)}, not {expected}[{parameters.dimension}]"
    if (vector.astype(np.uint64) > modular.modulus_mask(parameters.bits)).any():
        return f"sent a masked input outside Z/2^{parameters.bits}"
    return None
