"""Canaries for the one-run privacy audit: held-out images with a wrong label.

A mislabelled image is what a model can only get right by memorising it, so its loss
under the trained model says whether it was trained on. The canaries come out of the
server's held-out test split (so no site already holds them); each is given a wrong
label and a fair coin decides whether the audited site trains on it. Both choices are
drawn from the run's seed, so the auditor recomputes them from config.json alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.dataset import LabeledImages
from common.errors import CohortInputError

# Kept apart from the seeds of the split and partitions, so canaries=0 changes nothing.
_CANARY_STREAM = 0xCA7A


@dataclass(frozen=True)
class Canaries:
    """m canary images with their wrong labels, and which of them the site trains on."""

    examples: LabeledImages
    included: np.ndarray

    @property
    def trained_on(self) -> LabeledImages:
        return self.examples.subset(np.flatnonzero(self.included))


def draw_canaries(test: LabeledImages, num_classes: int, count: int, seed: int) -> tuple[Canaries, LabeledImages]:
    """The canaries, and the test split without them (they must not score the model)."""
    if count > len(test) // 2:
        raise CohortInputError(
            f"audit-canaries is {count}, but the held-out test split has {len(test)} images and at most half "
            f"({len(test) // 2}) may become canaries; use fewer canaries or a larger dataset (e.g. mnist-5k)"
        )
    if num_classes < 2:
        raise CohortInputError("canaries need at least 2 classes to carry a wrong label")
    rng = np.random.default_rng([seed, _CANARY_STREAM])
    chosen = rng.choice(len(test), size=count, replace=False)
    images = test.subset(chosen)
    wrong = (images.labels + rng.integers(1, num_classes, size=count)) % num_classes
    included = rng.random(count) < 0.5
    rest = np.setdiff1d(np.arange(len(test)), chosen)
    return Canaries(LabeledImages(images.images, wrong.astype(np.int64)), included), test.subset(rest)
