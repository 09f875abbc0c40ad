"""In-memory labelled image data, the one shape every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import CohortInputError


@dataclass(frozen=True)
class LabeledImages:
    """Images as float32 (N, C, H, W) scaled to [-1, 1] and int64 labels (N,).

    A fixed scaling rather than per-dataset statistics, so that every site and the
    server normalise identically without sharing anything about their data.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise CohortInputError(f"images must be (N, C, H, W); got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise CohortInputError(
                f"{len(self.images)} images but {len(self.labels)} labels; each image needs one label"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> LabeledImages:
        return LabeledImages(self.images[indices], self.labels[indices])

    def concat(self, other: LabeledImages) -> LabeledImages:
        return LabeledImages(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]))


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset as loaded: its training pool, and its own test split if it has one."""

    train: LabeledImages
    test: LabeledImages | None
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


def to_labeled_images(raw_images: np.ndarray, raw_labels: np.ndarray, max_value: float, source: str) -> LabeledImages:
    """Turn (N, H, W) or (N, H, W, C) pixel arrays into normalised NCHW float32."""
    images = np.asarray(raw_images)
    if len(images) != len(raw_labels):
        raise CohortInputError(
            f"{source}: {len(images)} images but {len(raw_labels)} labels; each image needs one label"
        )
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4:
        images = np.transpose(images, (0, 3, 1, 2))
    else:
        raise CohortInputError(f"{source}: images have shape {raw_images.shape}; expected (N, H, W) or (N, H, W, C)")
    labels = np.asarray(raw_labels).reshape(len(raw_labels), -1)
    if labels.shape[1] != 1:
        raise CohortInputError(f"{source}: labels have shape {raw_labels.shape}; expected one class id per image")
    labels = labels[:, 0]
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise CohortInputError(f"{source}: labels must be non-negative integer class ids")
    scaled = images.astype(np.float32) / np.float32(max_value)
    return LabeledImages(images=(scaled - 0.5) / 0.5, labels=labels.astype(np.int64))
