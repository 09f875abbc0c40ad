"""Vectors in Z/2^b: where masked inputs live.

Every value is held in uint64 and reduced with a bit mask: uint64 arithmetic wraps modulo
2^64, and 2^b divides 2^64, so sums and differences stay exact modulo 2^b (b <= MAX_BITS,
which keeps the signed view of a value within int64).
Masks are a ChaCha20 keystream (`cryptography`) keyed by a secret the sites agreed on or
a site drew, one key per mask and round, so the zero nonce is never reused under a key
(not NumPy's RandomState, whose 32-bit seed Flower's own SecAgg+ uses: Flower issue #7522).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MAX_BITS = 62
_WORD = np.dtype("<u8")
_ZERO_NONCE = bytes(16)


def modulus_mask(bits: int) -> np.uint64:
    """2^bits - 1, the mask that reduces a uint64 modulo 2^bits."""
    return np.uint64((1 << bits) - 1)


def keystream_mask(key: bytes, length: int, bits: int) -> np.ndarray:
    """`length` values uniform in Z/2^bits, expanded from a 32-byte key."""
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(length * _WORD.itemsize))
    return np.frombuffer(stream, dtype=_WORD) & modulus_mask(bits)


def to_field(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers as elements of Z/2^bits (two's complement, reduced)."""
    return values.astype(np.int64).view(np.uint64) & modulus_mask(bits)


def from_field(values: np.ndarray, bits: int) -> np.ndarray:
    """Elements of Z/2^bits as signed integers in [-2^(bits-1), 2^(bits-1))."""
    signed = (values.astype(np.uint64) & modulus_mask(bits)).astype(np.int64)
    return np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a + b) & modulus_mask(bits)


def subtract(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a - b) & modulus_mask(bits)


def wire_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned type a masked input travels in."""
    return np.dtype("<u4") if bits <= 32 else _WORD
