"""The messages of a secure aggregation round, as Flower records.

Each stage is one exchange: the coordinator sends every site of the round a request in a
ConfigRecord under RECORD (the stage's name in it), and each site answers in a
ConfigRecord under the same key; a site's masked input travels as an ArrayRecord under
MASKED_INPUT beside the rest of a training reply. The masked-input request also carries
the training request itself (the global model and the round's config).

Both sides read what the other sent as untrusted input: `from_record` returns the typed
message or raises ProtocolViolation naming what is wrong. A site that declines a stage
answers with an Error of code REFUSED, whose reason says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.secure_aggregation.parameters import SecAggParameters

RECORD = "secure-aggregation"
MASKED_INPUT = "masked-input"
MASKED_VECTOR = "vector"
# Error code of a reply in which a site declines a stage of the protocol.
REFUSED = 4032
PUBLIC_KEY_BYTES = 32
COMMITMENT_BYTES = 32


class Stage(StrEnum):
    """The four stages of a round, in order."""

    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    UNMASK = "unmask"


class ProtocolViolation(ValueError):
    """A message that does not follow the protocol; its text is one line."""


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 1 request: take part in this round with these parameters."""

    server_round: int
    parameters: SecAggParameters

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {_STAGE: str(Stage.ADVERTISE_KEYS), _ROUND: self.server_round, **self.parameters.to_record()}
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> AdvertiseKeys:
        try:
            parameters = SecAggParameters.from_record(record)
        except ValueError as error:
            raise ProtocolViolation(f"the round's parameters cannot be used: {error}") from None
        return cls(_int(record, _ROUND), parameters)


@dataclass(frozen=True)
class PublicKeys:
    """Stage 1 reply: the site's two fresh X25519 public keys for this round."""

    encryption_key: bytes
    masking_key: bytes

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"encryption-key": self.encryption_key, "masking-key": self.masking_key})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PublicKeys:
        keys = cls(_bytes(record, "encryption-key", PUBLIC_KEY_BYTES), _bytes(record, "masking-key", PUBLIC_KEY_BYTES))
        if keys.encryption_key == keys.masking_key:
            raise ProtocolViolation("sent the same public key twice")
        return keys


@dataclass(frozen=True)
class ShareKeys:
    """Stage 2 request: the public keys of the site's neighbourhood, the site included,
    ordered by node id; a site's position in it is the evaluation point of the share it
    holds of each neighbour's secrets."""

    server_round: int
    holders: tuple[int, ...]
    encryption_keys: tuple[bytes, ...]
    masking_keys: tuple[bytes, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                _STAGE: str(Stage.SHARE_KEYS),
                _ROUND: self.server_round,
                "holders": list(self.holders),
                "encryption-keys": list(self.encryption_keys),
                "masking-keys": list(self.masking_keys),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ShareKeys:
        holders = _ints(record, "holders")
        if list(holders) != sorted(set(holders)):
            raise ProtocolViolation("lists its share holders out of order or twice")
        encryption = _bytes_list(record, "encryption-keys", PUBLIC_KEY_BYTES, len(holders))
        masking = _bytes_list(record, "masking-keys", PUBLIC_KEY_BYTES, len(holders))
        if len(set(encryption) | set(masking)) != 2 * len(holders):
            raise ProtocolViolation("lists a public key twice")
        return cls(_int(record, _ROUND), holders, encryption, masking)


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 2 reply: for each other holder, the site's shares of its mask seed and of its
    masking key, encrypted to that holder; and a commitment to the mask seed."""

    receivers: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]
    seed_commitment: bytes

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "receivers": list(self.receivers),
                "ciphertexts": list(self.ciphertexts),
                "seed-commitment": self.seed_commitment,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> EncryptedShares:
        receivers = _ints(record, "receivers")
        if len(set(receivers)) != len(receivers):
            raise ProtocolViolation("addresses two ciphertexts to one site")
        return cls(
            receivers,
            _bytes_list(record, "ciphertexts", None, len(receivers)),
            _bytes(record, "seed-commitment", COMMITMENT_BYTES),
        )


@dataclass(frozen=True)
class ForwardedShares:
    """Stage 3 request (beside the training request): the ciphertexts other sites
    addressed to this site. The site masks its input against exactly these senders."""

    server_round: int
    senders: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                _STAGE: str(Stage.MASKED_INPUT),
                _ROUND: self.server_round,
                "senders": list(self.senders),
                "ciphertexts": list(self.ciphertexts),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ForwardedShares:
        senders = _ints(record, "senders")
        if len(set(senders)) != len(senders):
            raise ProtocolViolation("forwards two ciphertexts from one site")
        return cls(_int(record, _ROUND), senders, _bytes_list(record, "ciphertexts", None, len(senders)))


@dataclass(frozen=True)
class Unmask:
    """Stage 4 request: which of the site's neighbourhood sent a masked input (reveal its
    mask-seed share) and which dropped after sharing (reveal its masking-key share)."""

    server_round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                _STAGE: str(Stage.UNMASK),
                _ROUND: self.server_round,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Unmask:
        survivors, dropped = _ints(record, "survivors"), _ints(record, "dropped")
        if set(survivors) & set(dropped):
            raise ProtocolViolation("names a site both as a survivor and as dropped")
        return cls(_int(record, _ROUND), survivors, dropped)


@dataclass(frozen=True)
class RevealedShares:
    """Stage 4 reply: one share per site the request named, in the request's order
    (survivors then dropped)."""

    owners: tuple[int, ...]
    shares: tuple[bytes, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"owners": list(self.owners), "shares": list(self.shares)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RevealedShares:
        owners = _ints(record, "owners")
        return cls(owners, _bytes_list(record, "shares", None, len(owners)))


def masked_input_record(vector: np.ndarray) -> ArrayRecord:
    """Stage 3 reply: the site's masked input, flat."""
    return ArrayRecord({MASKED_VECTOR: Array(vector)})


Request = AdvertiseKeys | ShareKeys | ForwardedShares | Unmask
_REQUESTS: dict[str, type[AdvertiseKeys | ShareKeys | ForwardedShares | Unmask]] = {
    Stage.ADVERTISE_KEYS: AdvertiseKeys,
    Stage.SHARE_KEYS: ShareKeys,
    Stage.MASKED_INPUT: ForwardedShares,
    Stage.UNMASK: Unmask,
}
_STAGE = "stage"
_ROUND = "round"


def read_request(record: ConfigRecord) -> Request:
    """The coordinator's request in `record`, whichever stage it is."""
    stage = record.get(_STAGE)
    if stage not in _REQUESTS:
        raise ProtocolViolation(f"names no known stage ({str(stage)[:40]!r})")
    return _REQUESTS[stage].from_record(record)


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolViolation(f"has no integer '{key}'")
    return value


def _ints(record: ConfigRecord, key: str) -> tuple[int, ...]:
    value: Any = record.get(key)
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise ProtocolViolation(f"has no list of node ids '{key}'")
    return tuple(value)


def _bytes(record: ConfigRecord, key: str, length: int) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or len(value) != length:
        raise ProtocolViolation(f"has no {length}-byte '{key}'")
    return value


def _bytes_list(record: ConfigRecord, key: str, length: int | None, count: int) -> tuple[bytes, ...]:
    value: Any = record.get(key)
    if (
        not isinstance(value, list)
        or len(value) != count
        or any(not isinstance(v, bytes) or (length is not None and len(v) != length) for v in value)
    ):
        raise ProtocolViolation(f"has no list of {count} byte strings '{key}'")
    return tuple(value)
