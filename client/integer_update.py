"""What a site's update becomes before it is masked: a vector of integers whose sum over
the sites the coordinator can unmask, and, under distributed DP, already noised.

Clip to L2 norm C (so one site moves the sum by a bounded amount), multiply by the
round's scale, round each coordinate up or down at random with the probabilities that
keep it unbiased (stochastic rounding), and add the site's share of Skellam noise. Every
random bit comes from the site's noise source (common/privacy/noise.py).
"""

from __future__ import annotations

import numpy as np

from client.integer_noise import skellam
from common.privacy.noise import NoiseSource
from common.secure_aggregation.parameters import SecAggParameters

# The stream of a simulated site's seeded noise source that its rounding and Skellam noise
# draw from, apart from its DP-SGD's (client/dp_randomness.py).
SECURE_AGGREGATION_STREAM = "secure-aggregation"


# Clipping aims a hair under C, so that float rounding cannot carry a norm past C (which
# the sensitivity the noise is sized for assumes).
_CLIP_MARGIN = 1 - 2.0**-40


def clipped(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """`update` scaled down to L2 norm at most `clip_norm` when it is longer."""
    norm = float(np.linalg.norm(update))
    return update * (clip_norm * _CLIP_MARGIN / norm) if norm > clip_norm * _CLIP_MARGIN else update


def integer_update(update: np.ndarray, parameters: SecAggParameters, source: NoiseSource) -> np.ndarray:
    """The int64 vector this site masks: clipped, scaled, stochastically rounded, noised."""
    scaled = clipped(update.astype(np.float64), parameters.clip_norm) * parameters.scale
    floor = np.floor(scaled)
    rounded = floor + (source.uniform(scaled.size).numpy() < scaled - floor)
    return rounded.astype(np.int64) + skellam(parameters.noise_variance, scaled.size, source)
