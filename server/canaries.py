"""Canaries for the one-run privacy audit, of two kinds (DataConfig.audit_canary_kind).

Input canaries are held-out images with a wrong label. A mislabelled image is what a
model can only get right by memorising it, so its loss under the trained model says
whether it was trained on. They come out of the server's held-out test split (so no site
already holds them); each is given a wrong label.

Gradient ("Dirac") canaries are examples whose gradient is a fixed coordinate direction
of the model at the clip norm, whatever the model's weights (Nasr et al., "Tight Auditing
of Differentially Private Machine Learning", USENIX Security 2023). DP-SGD must hide any
one example's clipped gradient, so it must hide these; and since nothing else pushes one
coordinate steadily, each round's update along it shows them as plainly as the noise
allows: the strongest canary a white-box auditor of DP-SGD has. Each is one coordinate of
the flattened trainable parameters, drawn without repetition.

Of either kind, a fair coin decides whether the audited site trains on each canary. Every
choice is drawn from the run's seed, so the auditor recomputes them from config.json alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.data.dataset import LabeledImages
from common.errors import CohortInputError

# Kept apart from the seeds of the split and partitions, so canaries=0 changes nothing.
_CANARY_STREAM = 0xCA7A
_GRADIENT_CANARY_STREAM = 0xD1AC


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


@dataclass(frozen=True)
class GradientCanaries:
    """m gradient canaries: the coordinate of each in the model's flattened trainable
    parameters (in `named_parameters` order), and which of them the site trains on."""

    coordinates: np.ndarray
    included: np.ndarray

    @property
    def trained_on(self) -> np.ndarray:
        return self.coordinates[self.included]


def draw_gradient_canaries(model: torch.nn.Module, count: int, seed: int) -> GradientCanaries:
    """`count` distinct coordinates of `model`'s trainable parameters, each trained on with probability 1/2."""
    dimension = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count > dimension // 2:
        raise CohortInputError(
            f"audit-canaries is {count}, but the model has {dimension} trainable parameters and at most half "
            f"({dimension // 2}) may carry a gradient canary; use fewer canaries"
        )
    rng = np.random.default_rng([seed, _GRADIENT_CANARY_STREAM])
    coordinates = np.sort(rng.choice(dimension, size=count, replace=False)).astype(np.int64)
    return GradientCanaries(coordinates, rng.random(count) < 0.5)
