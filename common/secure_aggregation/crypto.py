"""The cryptography secure aggregation rests on, every operation from a maintained library.

- Key agreement: X25519 (`cryptography`), the shared secret stretched by HKDF-SHA256 with
  a label per purpose and the run and round in its info, so that no key serves two
  purposes or two rounds.
- Authenticated encryption of the Shamir shares that travel through the coordinator:
  ChaCha20-Poly1305 (`cryptography`), the route (run, round, sender, receiver) as
  associated data, so a ciphertext the coordinator alters or delivers to another site
  does not open.
- Shamir secret sharing: Flower's `flwr.common.secure_aggregation.crypto.shamir`
  (pycryptodome's GF(2^128) Shamir underneath); each share carries its own index.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

KEY_BYTES = 32
NONCE_BYTES = 12
PAIRWISE_MASK = b"cohort secure aggregation: pairwise mask"
SHARE_ENCRYPTION = b"cohort secure aggregation: share encryption"


class DecryptionFailed(ValueError):
    """A ciphertext did not authenticate: altered, truncated, or meant for another route."""


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw (32 bytes): what a site keeps for one round."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private_key: bytes) -> bytes:
    """The raw X25519 public key (32 bytes) of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agreed_key(private_key: bytes, peer_public_key: bytes, purpose: bytes, run_id: int, server_round: int) -> bytes:
    """The 32-byte key two sites agree on for one purpose in one round.

    Raises ValueError for a peer key that is not a valid X25519 point (cryptography refuses
    a low-order point, whose shared secret would be all zeros)."""
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public_key)
    )
    info = purpose + struct.pack(">QQ", run_id, server_round)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def route(run_id: int, server_round: int, sender: int, receiver: int) -> bytes:
    """The associated data binding a ciphertext to the one delivery it was made for."""
    return struct.pack(">QQQQ", run_id, server_round, sender, receiver)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Nonce || ChaCha20-Poly1305 ciphertext and tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """The plaintext of `seal`'s output, or DecryptionFailed."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise DecryptionFailed("the ciphertext does not authenticate") from None


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` Shamir shares of `secret`, any `threshold` of which rebuild it; share i has
    evaluation point i + 1, written into its first bytes."""
    return create_shares(secret, threshold, count)


def combine_secret(shares: list[bytes]) -> bytes:
    """The secret `shares` rebuild, or ValueError when they are malformed or inconsistent."""
    try:
        return combine_shares(shares)
    except (ValueError, IndexError, TypeError) as error:
        raise ValueError(f"the shares do not combine ({error})") from None


def commitment(secret: bytes) -> bytes:
    """SHA-256 of a secret: the coordinator checks a rebuilt secret against it."""
    return hashlib.sha256(secret).digest()
