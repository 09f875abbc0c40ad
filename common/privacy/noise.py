"""Where the randomness of a DP release comes from: its Gaussian noise and its sampling.

Two sources, one interface. A deployed site's DP-SGD and a deployed coordinator's
client-level noise use `SecureNoise`; a simulation uses `SeededNoise` unless the researcher
asks for the secure one, so that the same seed gives the same run, noise included.

Why not PyTorch's generator, seeded from a CSPRNG? PyTorch's CPU generator is an MT19937
that keeps only the low 32 bits of its seed (`manual_seed(s)` and `manual_seed(s + 2**32)`
give the same stream; its own start-up seed is random but likewise cut to 32 bits). An
observer of a released update can try all 2**32 seeds, regenerate the noise of each and
keep the one that leaves a residual no larger than a clipped sum: the noise is then known
and subtracted. Filling MT19937's whole 19,968-bit state from os.urandom instead would not
make it a CSPRNG either: its output is linear in its state, recoverable from 624 outputs.
The noise has to come from a cipher's keystream, so that predicting it means breaking the
cipher.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from common.config import SECURE_NOISE, SEEDED_NOISE

_UNIFORM_BITS = 53  # a float64 in [0, 1) holds 53 random bits
_CHACHA20_KEY_BYTES = 32
_CHACHA20_NONCE = bytes(16)  # each key is used once (see SecureNoise), so the nonce may be fixed
# Holohan & Braghin's defence: each noise value is the sum of this many Gaussians (2n, n = 2).
_SUMMANDS = 4


class NoiseSource(Protocol):
    """The random draws of one DP mechanism's releases, all on the CPU."""

    name: str

    def gaussian(self, count: int, std: float) -> torch.Tensor:
        """`count` independent draws from N(0, std^2), as one flat float tensor."""
        ...

    def uniform(self, count: int) -> torch.Tensor:
        """`count` independent draws from U[0, 1), as float64 (Poisson sampling's coins)."""
        ...


class SecureNoise:
    """Gaussian noise from ChaCha20's keystream, hardened against floating-point attacks.

    Bits: the keystream of ChaCha20 (`cryptography`, OpenSSL's implementation) under a
    256-bit key from os.urandom, a fresh key for every draw: no keystream is ever reused,
    also in a process forked after this object was made (the key is never held), and a
    key compromised later reveals nothing of earlier draws; one key's 2**32 blocks cover a
    draw for up to 8e9 parameters. ChaCha20 rather than AES-CTR: constant time without AES
    instructions (a device site may lack them); the Gaussian transform, not the keystream,
    is most of the cost either way.

    Transform: 53-bit uniforms (exact float64 values k / 2**53), then Box-Muller in float64,
    which uses both outputs of each pair of uniforms.

    Floating-point defence: Mironov (CCS 2012) showed that a textbook Laplace sampler in
    floating point leaves holes in the set of values it can output, so a release can reveal
    which input it came from; Jin et al. (arXiv 2112.05307) did the same to Opacus'
    Gaussian noise. Each noise value here is the sum of 4 Gaussians of half the std
    (Holohan & Braghin, "Secure Random Sampling in Differential Privacy", ESORICS 2021,
    arXiv 2107.10138, sec. 5.1, with 2n = 4 as Opacus' secure mode): to tell whether a
    released value is reachable from a candidate input, an attacker must now search for
    3 free 53-bit inputs, about 2**159 candidates, instead of inverting one sample. The
    4 summands of a value come from 4 different Box-Muller pairs: the cosine and sine of
    one pair sum to sqrt(2) r cos(theta - pi/4), a single sample again. The sum is formed
    in float64 and rounded once to the parameters' dtype.

    What it does not defend: timing side channels of the host, a compromised host or
    kernel RNG, and noise that is truncated at about 17 std (53-bit uniforms bound each
    Box-Muller radius by 8.6): the probability of a value beyond that is below 1e-60 per
    coordinate, far inside any delta.
    """

    name = SECURE_NOISE

    def gaussian(self, count: int, std: float) -> torch.Tensor:
        # Value j sums the cosines of pairs j and columns + j and the sines of pairs j - 1
        # and columns + j - 1 (cyclically): 4 pairs, all different once there are 2 columns.
        columns = max(count, 2)
        radius_u, angle_u = _keystream_uniforms(_SUMMANDS * columns).view(2, -1)
        radius = radius_u.neg_().add_(1.0).log_().mul_(-2.0).sqrt_()  # sqrt(-2 log(1 - u)), 1 - u exact and > 0
        angle = angle_u.mul_(2.0 * math.pi)
        summands = torch.empty(_SUMMANDS, columns, dtype=torch.float64)
        torch.mul(radius, torch.cos(angle), out=summands[:2].view(-1))
        summands[2:] = (radius * torch.sin(angle)).view(2, columns).roll(1, dims=1)
        return summands.sum(0).mul_(std / math.sqrt(_SUMMANDS))[:count]

    def uniform(self, count: int) -> torch.Tensor:
        return _keystream_uniforms(count)


class SeededNoise:
    """Noise from a torch.Generator seeded by (run seed, stream), for simulations.

    stream: who draws and when, e.g. (site name, round): sites and rounds differ, and a
    resumed run draws each round's noise afresh from the same seed. A site's identity is
    its name, never the Ray worker that happens to run it. Not secure: anyone who knows
    the seed knows the noise. (PyTorch keeps 32 bits of the seed, so two of a run's n
    streams coincide with probability about n**2 / 2**33: 1e-4 for 1,000 site-rounds.)
    """

    name = SEEDED_NOISE

    def __init__(self, seed: int, *stream: str | int) -> None:
        self._generator = torch.Generator().manual_seed(stream_seed(seed, *stream))

    def gaussian(self, count: int, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, (count,), generator=self._generator)

    def uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self._generator, dtype=torch.float64)


def noise_source(kind: str, seed: int, *stream: str | int) -> NoiseSource:
    """The source `kind` names; the secure one ignores seed and stream (it is never seeded)."""
    return SecureNoise() if kind == SECURE_NOISE else SeededNoise(seed, *stream)


def stream_seed(seed: int, *stream: str | int) -> int:
    """A 64-bit seed for one stream of a run: a hash, so that nearby seeds, sites and
    rounds give unrelated streams."""
    text = "\x1f".join(str(part) for part in (seed, *stream))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _keystream_uniforms(count: int) -> torch.Tensor:
    """`count` uniforms k / 2**53 from the top 53 bits of 64-bit keystream words."""
    key = os.urandom(_CHACHA20_KEY_BYTES)
    encryptor = Cipher(algorithms.ChaCha20(key, _CHACHA20_NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8")
    uniforms = (words >> np.uint64(64 - _UNIFORM_BITS)).astype(np.float64)
    return torch.from_numpy(np.multiply(uniforms, 2.0**-_UNIFORM_BITS, out=uniforms))
