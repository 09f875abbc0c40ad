"""A site's part in a secure aggregation round: four stages, its secrets kept in
Flower's per-run client state.

The secrets of a round (two X25519 private keys, the mask seed, and the shares of its
neighbours' secrets it holds) live in `context.state`, the RecordDict that the SuperNode
keeps in its memory across a run's messages and never sends anywhere: in deployment the
site's own flwr-clientapp pushes the context back after every message
(client/site_runner.py), in simulation Flower's engine keeps it per node. They are never
written to the ledger or to disk, and they are wiped once the round's unmask stage is
answered; a new round draws new keys.

What a site checks before it reveals anything (each failed check is a `Refused`, which the
site answers instead of the stage, so it drops out of the round):
- stages come in order, within one round;
- its own keys stand where the coordinator lists its neighbourhood, and that neighbourhood
  has at least the threshold's number of holders and at most k + 1;
- every share it receives authenticates for exactly its route (run, round, sender, itself);
- at the unmask stage: it is asked about each neighbour once (mask-seed share if the
  neighbour's input is in the sum, masking-key share if it dropped, never both), only
  about neighbours whose shares it holds, and at least `threshold` inputs of its
  neighbourhood are in the sum; and it answers one unmask request per round.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from common.secure_aggregation import crypto
from common.secure_aggregation import field as modular
from common.secure_aggregation.messages import (
    RECORD,
    REFUSED,
    AdvertiseKeys,
    EncryptedShares,
    ForwardedShares,
    ProtocolViolation,
    PublicKeys,
    RevealedShares,
    ShareKeys,
    Unmask,
    read_request,
)
from common.secure_aggregation.parameters import SecAggParameters

STATE = "secure-aggregation"
SEED_BYTES = 32

_Stored = TypeVar("_Stored")


class Refused(Exception):
    """The site declines a stage; the text is one line saying why."""


# The site's update as the integers it masks (client/integer_update.py), under a round's parameters.
Encode = Callable[[np.ndarray, SecAggParameters], np.ndarray]
# Turns the site's flat update (float, the global model's order), encoded, into its masked input.
Masker = Callable[[np.ndarray, Encode], np.ndarray]
# The site's training for the masked-input stage: it trains, masks its update with the
# masker, and returns its whole reply (the masked input beside whatever else it reports),
# or an error reply when it declines to train.
Contribute = Callable[[Masker], Message]


def key_stage_reply(message: Message, context: Context, site_name: str) -> Message | None:
    """The site's reply to a stage that needs neither its data nor a model (advertise keys,
    share keys, unmask); None for the masked-input stage, which needs training
    (`masked_input_reply`). Nothing the site's data says leaves it in these stages, so a
    deployed site answers them before it loads its training code (client/site_runner.py)."""
    try:
        request = read_request(message.content.config_records[RECORD])
        if isinstance(request, AdvertiseKeys):
            return _reply(message, advertise_keys(context, message.metadata.dst_node_id, request).to_record())
        if isinstance(request, ShareKeys):
            return _reply(message, share_keys(context, request).to_record())
        if isinstance(request, Unmask):
            return _reply(message, unmask(context, request).to_record())
        return None
    except (Refused, ProtocolViolation) as declined:
        return _declined(message, site_name, declined)


def masked_input_reply(message: Message, context: Context, site_name: str, contribute: Contribute) -> Message:
    """The masked-input stage: open the neighbours' shares (before any training, so a round
    the site cannot finish costs it no privacy), then train and mask."""
    try:
        request = ForwardedShares.from_record(message.content.config_records[RECORD])
        receive_shares(context, request)
        return contribute(lambda update, encode: masked_input(context, request.server_round, update, encode))
    except (Refused, ProtocolViolation) as declined:
        return _declined(message, site_name, declined)


def is_secure_aggregation(message: Message) -> bool:
    """Whether `message` is a stage of secure aggregation."""
    return message.has_content() and RECORD in message.content.config_records


def _declined(message: Message, site_name: str, declined: Exception) -> Message:
    return Message(
        Error(code=REFUSED, reason=f"site {site_name} leaves this secure aggregation round: {declined}"),
        reply_to=message,
    )


def _reply(message: Message, record: ConfigRecord) -> Message:
    return Message(RecordDict({RECORD: record}), reply_to=message)


class _Progress(StrEnum):
    KEYS_ADVERTISED = "keys-advertised"
    KEYS_SHARED = "keys-shared"
    SHARES_RECEIVED = "shares-received"
    INPUT_MASKED = "input-masked"


@dataclass
class _RoundSecrets:
    """Everything the site must remember between the stages of one round."""

    run_id: int
    server_round: int
    node: int
    progress: _Progress
    parameters: SecAggParameters
    encryption_private: bytes
    masking_private: bytes
    holders: list[int] = field(default_factory=list)
    masking_keys: list[bytes] = field(default_factory=list)
    encryption_keys: list[bytes] = field(default_factory=list)
    seed: bytes = b""
    senders: list[int] = field(default_factory=list)
    seed_shares: list[bytes] = field(default_factory=list)
    key_shares: list[bytes] = field(default_factory=list)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "run-id": self.run_id,
                "round": self.server_round,
                "node": self.node,
                "progress": str(self.progress),
                **self.parameters.to_record(),
                "encryption-private": self.encryption_private,
                "masking-private": self.masking_private,
                "holders": self.holders,
                "masking-keys": self.masking_keys,
                "encryption-keys": self.encryption_keys,
                "seed": self.seed,
                "senders": self.senders,
                "seed-shares": self.seed_shares,
                "key-shares": self.key_shares,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> _RoundSecrets:
        return cls(
            run_id=_stored(record, "run-id", int),
            server_round=_stored(record, "round", int),
            node=_stored(record, "node", int),
            progress=_Progress(_stored(record, "progress", str)),
            parameters=SecAggParameters.from_record(record),
            encryption_private=_stored(record, "encryption-private", bytes),
            masking_private=_stored(record, "masking-private", bytes),
            holders=list(_stored(record, "holders", list)),
            masking_keys=list(_stored(record, "masking-keys", list)),
            encryption_keys=list(_stored(record, "encryption-keys", list)),
            seed=_stored(record, "seed", bytes),
            senders=list(_stored(record, "senders", list)),
            seed_shares=list(_stored(record, "seed-shares", list)),
            key_shares=list(_stored(record, "key-shares", list)),
        )

    def share_key(self, other: int) -> bytes:
        """The key this site and `other` encrypt shares to each other with."""
        peer = self.encryption_keys[self.holders.index(other)]
        return crypto.agreed_key(self.encryption_private, peer, crypto.SHARE_ENCRYPTION, self.run_id, self.server_round)


def _stored(record: ConfigRecord, key: str, kind: type[_Stored]) -> _Stored:
    """A value this site kept in its own state between stages; another type means that
    state was not written by this code."""
    value = record[key]
    if not isinstance(value, kind):
        raise TypeError(f"the site's secure aggregation state holds a {type(value).__name__} as '{key}'")
    return value


def advertise_keys(context: Context, node: int, request: AdvertiseKeys) -> PublicKeys:
    """Stage 1: draw this round's two key pairs (any earlier round's secrets are dropped)."""
    _forget(context)
    secrets = _RoundSecrets(
        run_id=context.run_id,
        server_round=request.server_round,
        node=node,
        progress=_Progress.KEYS_ADVERTISED,
        parameters=request.parameters,
        encryption_private=crypto.new_private_key(),
        masking_private=crypto.new_private_key(),
    )
    _save(context, secrets)
    return PublicKeys(crypto.public_key(secrets.encryption_private), crypto.public_key(secrets.masking_private))


def share_keys(context: Context, request: ShareKeys) -> EncryptedShares:
    """Stage 2: split a fresh mask seed and the masking key among the neighbourhood, and
    encrypt each holder's pair of shares to it."""
    secrets = _expect(context, _Progress.KEYS_ADVERTISED, request.server_round)
    parameters = secrets.parameters
    holders = list(request.holders)
    if secrets.node not in holders:
        raise Refused("the coordinator left this site out of its own neighbourhood")
    mine = holders.index(secrets.node)
    own_keys = (crypto.public_key(secrets.encryption_private), crypto.public_key(secrets.masking_private))
    if (request.encryption_keys[mine], request.masking_keys[mine]) != own_keys:
        raise Refused("the coordinator lists public keys for this site that are not its own")
    if not parameters.threshold <= len(holders) <= parameters.neighbours + 1:
        raise Refused(
            f"its neighbourhood has {len(holders)} sites; the round needs {parameters.threshold} to "
            f"{parameters.neighbours + 1}"
        )
    secrets.holders, secrets.encryption_keys, secrets.masking_keys = (
        holders,
        list(request.encryption_keys),
        list(request.masking_keys),
    )
    secrets.seed = os.urandom(SEED_BYTES)
    seed_shares = crypto.split_secret(secrets.seed, parameters.threshold, len(holders))
    key_shares = crypto.split_secret(secrets.masking_private, parameters.threshold, len(holders))
    receivers, ciphertexts = [], []
    for position, holder in enumerate(holders):
        if holder == secrets.node:
            continue
        try:
            key = secrets.share_key(holder)
        except ValueError:
            raise Refused(f"node {holder}'s encryption key is not a valid X25519 key") from None
        route = crypto.route(secrets.run_id, secrets.server_round, secrets.node, holder)
        receivers.append(holder)
        ciphertexts.append(crypto.seal(key, _pair(seed_shares[position], key_shares[position]), route))
    secrets.senders, secrets.seed_shares, secrets.key_shares = [secrets.node], [seed_shares[mine]], [key_shares[mine]]
    secrets.progress = _Progress.KEYS_SHARED
    _save(context, secrets)
    return EncryptedShares(tuple(receivers), tuple(ciphertexts), crypto.commitment(secrets.seed))


def receive_shares(context: Context, request: ForwardedShares) -> None:
    """Stage 3, first half (before any training): open the shares other sites sent."""
    secrets = _expect(context, _Progress.KEYS_SHARED, request.server_round)
    if secrets.node in request.senders or not set(request.senders) <= set(secrets.holders):
        raise Refused("the coordinator forwarded shares from sites outside this site's neighbourhood")
    if len(request.senders) + 1 < secrets.parameters.threshold:
        raise Refused(
            f"only {len(request.senders)} neighbours shared their secrets; the round needs "
            f"{secrets.parameters.threshold - 1} to stay unmaskable"
        )
    for sender, ciphertext in zip(request.senders, request.ciphertexts, strict=True):
        try:
            seed_share, key_share = _unpair(
                crypto.open_sealed(
                    secrets.share_key(sender),
                    ciphertext,
                    crypto.route(secrets.run_id, secrets.server_round, sender, secrets.node),
                )
            )
        except ValueError:
            raise Refused(
                f"the shares forwarded from node {sender} do not authenticate; this site takes no part in the round"
            ) from None
        secrets.senders.append(sender)
        secrets.seed_shares.append(seed_share)
        secrets.key_shares.append(key_share)
    secrets.progress = _Progress.SHARES_RECEIVED
    _save(context, secrets)


def masked_input(context: Context, server_round: int, update: np.ndarray, encode: Encode) -> np.ndarray:
    """Stage 3, second half: the update (flat, in the global model's order) as integers,
    plus the mask from the seed, plus one pairwise mask per neighbour that shared
    (added towards higher node ids, subtracted towards lower: they cancel in the sum)."""
    secrets = _expect(context, _Progress.SHARES_RECEIVED, server_round)
    parameters = secrets.parameters
    if update.shape != (parameters.dimension,) or not np.isfinite(update).all():
        raise Refused(f"its update is not {parameters.dimension} finite numbers")
    bits, length = parameters.bits, parameters.dimension
    masked = modular.to_field(encode(update, parameters), bits)
    masked = modular.add(masked, modular.keystream_mask(secrets.seed, length, bits), bits)
    for neighbour in secrets.senders:
        if neighbour == secrets.node:
            continue
        peer = secrets.masking_keys[secrets.holders.index(neighbour)]
        pairwise = modular.keystream_mask(
            crypto.agreed_key(
                secrets.masking_private, peer, crypto.PAIRWISE_MASK, secrets.run_id, secrets.server_round
            ),
            length,
            bits,
        )
        masked = (
            modular.add(masked, pairwise, bits)
            if secrets.node < neighbour
            else modular.subtract(masked, pairwise, bits)
        )
    secrets.progress = _Progress.INPUT_MASKED
    _save(context, secrets)
    return masked.astype(modular.wire_dtype(bits))


def unmask(context: Context, request: Unmask) -> RevealedShares:
    """Stage 4: reveal one share per neighbour, then forget the round."""
    secrets = _expect(context, _Progress.INPUT_MASKED, request.server_round)
    survivors, dropped = set(request.survivors), set(request.dropped)
    if secrets.node not in survivors:
        raise Refused("the coordinator does not count this site's own input in the sum")
    if not (survivors | dropped) <= set(secrets.senders):
        raise Refused("the coordinator asks for shares of sites that did not share with this site")
    if len(survivors) < secrets.parameters.threshold:
        raise Refused(
            f"only {len(survivors)} inputs of its neighbourhood are in the sum, fewer than the threshold "
            f"{secrets.parameters.threshold}"
        )
    shares = [secrets.seed_shares[secrets.senders.index(owner)] for owner in request.survivors]
    shares += [secrets.key_shares[secrets.senders.index(owner)] for owner in request.dropped]
    _forget(context)
    return RevealedShares(request.survivors + request.dropped, tuple(shares))


def _expect(context: Context, progress: _Progress, server_round: int) -> _RoundSecrets:
    record = context.state.config_records.get(STATE)
    if record is None:
        raise Refused("it holds no secure aggregation round in progress (the stages came out of order)")
    secrets = _RoundSecrets.from_record(record)
    if (secrets.run_id, secrets.server_round, secrets.progress) != (context.run_id, server_round, progress):
        raise Refused(
            f"the coordinator asked for round {server_round} after {secrets.progress} of round {secrets.server_round}; "
            "the stages came out of order"
        )
    return secrets


def _save(context: Context, secrets: _RoundSecrets) -> None:
    context.state.config_records[STATE] = secrets.to_record()


def _forget(context: Context) -> None:
    context.state.config_records.pop(STATE, None)


def _pair(seed_share: bytes, key_share: bytes) -> bytes:
    return struct.pack(">H", len(seed_share)) + seed_share + key_share


def _unpair(plaintext: bytes) -> tuple[bytes, bytes]:
    length = int.from_bytes(plaintext[:2], "big")
    if len(plaintext) != 2 + 2 * length:
        raise ValueError("a share pair of the wrong length")
    return plaintext[2 : 2 + length], plaintext[2 + length :]
