"""The integer noise a site adds before masking: Skellam, drawn from the site's noise source.

Skellam(mu) is the difference of two independent Poisson(mu / 2) variables: integer-valued,
variance mu, and closed under summation, so the sites' shares add up to exactly the noise
the coordinator's accounting assumes (common/privacy/skellam.py).

Every random bit comes from the site's NoiseSource (common/privacy/noise.py), the one its
DP-SGD draws from: at a deployed site ChaCha20's keystream under keys from the operating
system (whoever learnt a generator's state could subtract the noise); in a simulation a
seeded stream unless the run asks for the secure one, so that a seed repeats a run.

Poisson sampling: inversion for small means; for means of 10 and more Hormann's
transformed rejection (PTRS, 1993), the algorithm NumPy ships, here vectorised and with
the acceptance test in a cancellation-free form (the saddle-point form of Loader's dpois),
because the means a site draws reach 10^10, where NumPy's `k log(mu) - lgamma(k + 1)`
loses digits. Doubles carry 53 random bits; the draw is an integer.
"""

from __future__ import annotations

import math

import numpy as np

from common.privacy.noise import NoiseSource

_PTRS_MIN_MEAN = 10.0
_STIRLING_MIN = 15


def _uniform(source: NoiseSource, count: int) -> np.ndarray:
    """`count` doubles uniform on the open interval (0, 1): the source's draws on [0, 1),
    a draw of 0 (probability 2^-53) moved to the middle of the lowest step."""
    draws = source.uniform(count).numpy()
    return np.where(draws > 0, draws, 2.0**-54)


def skellam(variance: float, count: int, source: NoiseSource) -> np.ndarray:
    """`count` independent Skellam(variance) integers (int64)."""
    if variance == 0:
        return np.zeros(count, dtype=np.int64)
    return poisson(variance / 2, count, source) - poisson(variance / 2, count, source)


def poisson(mean: float, count: int, source: NoiseSource) -> np.ndarray:
    """`count` independent Poisson(mean) integers (int64)."""
    if mean < _PTRS_MIN_MEAN:
        return _poisson_inversion(mean, count, source)
    return _poisson_ptrs(mean, count, source)


def _poisson_inversion(mean: float, count: int, source: NoiseSource) -> np.ndarray:
    """Walk the CDF up from 0 until it passes a uniform draw."""
    u = _uniform(source, count)
    result = np.zeros(count, dtype=np.int64)
    probability = math.exp(-mean)
    cdf = np.full(count, probability)
    k = 0
    active = u > cdf
    while active.any():
        k += 1
        probability *= mean / k
        result[active] = k
        cdf[active] += probability
        active &= u > cdf
        if probability == 0.0:  # beyond double precision: the remaining mass is below 2^-53
            break
    return result


def _poisson_ptrs(mean: float, count: int, source: NoiseSource) -> np.ndarray:
    """Hormann's PTRS, every draw retried until accepted."""
    root = math.sqrt(mean)
    b = 0.931 + 2.53 * root
    a = -0.059 + 0.02483 * b
    log_inverse_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    squeeze = 0.9277 - 3.6224 / (b - 2)
    result = np.empty(count, dtype=np.int64)
    pending = np.arange(count)
    while pending.size:
        u = _uniform(source, pending.size) - 0.5
        v = _uniform(source, pending.size)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / us + b) * u + mean + 0.43)
        accepted = (us >= 0.07) & (v <= squeeze)
        possible = ~accepted & (k >= 0) & ~((us < 0.013) & (v > us))
        candidates = np.flatnonzero(possible)
        if candidates.size:
            kc = k[candidates]
            lhs = np.log(v[candidates]) + log_inverse_alpha - np.log(a / us[candidates] ** 2 + b)
            accepted[candidates] = lhs <= _log_poisson_pmf(kc, mean)
        result[pending[accepted]] = k[accepted].astype(np.int64)
        pending = pending[~accepted]
    return result


def _log_poisson_pmf(k: np.ndarray, mean: float) -> np.ndarray:
    """log(mean^k e^-mean / k!) for integer-valued k >= 0, accurate for means near 10^10.

    For k >= 15: -(k log(k / mean) + mean - k) - log(2 pi k) / 2 - stirlerr(k), with the
    first term computed as k log1p((k - mean) / mean) - (k - mean), which has no large
    terms to cancel, and Stirling's series for stirlerr. Below, the direct formula is exact
    enough (every term is small)."""
    small = k < _STIRLING_MIN
    out = np.empty_like(k)
    ks = k[small]
    out[small] = -mean + ks * math.log(mean) - _lgamma(ks + 1)
    kl = k[~small]
    deviation = kl * np.log1p((kl - mean) / mean) - (kl - mean)
    stirlerr = 1 / (12 * kl) - 1 / (360 * kl**3) + 1 / (1260 * kl**5)
    out[~small] = -deviation - 0.5 * np.log(2 * math.pi * kl) - stirlerr
    return out


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(value) for value in x], dtype=np.float64)
