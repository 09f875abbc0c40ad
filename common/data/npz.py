"""User data in the MedMNIST .npz layout: train_/val_/test_ images and labels."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from common.data.dataset import DatasetSplits, LabeledImages, to_labeled_images
from common.errors import CohortInputError

REQUIRED_KEYS = ("train_images", "train_labels")
OPTIONAL_SPLITS = ("val", "test")


def load_npz(path: Path) -> DatasetSplits:
    """Load train (required), val and test (optional) splits; val joins the training pool.

    Validation data stays with the sites: each site carves its own validation split from
    its partition, so a separate val split only adds training examples.
    """
    arrays = _read_arrays(path)
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise CohortInputError(
            f"{path}: missing key(s) {', '.join(missing)}; a dataset .npz needs train_images and "
            "train_labels (and optionally val_* and test_*), as in MedMNIST"
        )
    max_value = 255.0 if arrays["train_images"].dtype == np.uint8 else 1.0
    train = to_labeled_images(arrays["train_images"], arrays["train_labels"], max_value, f"{path} train")
    extra: dict[str, LabeledImages] = {}
    for split in OPTIONAL_SPLITS:
        images_key, labels_key = f"{split}_images", f"{split}_labels"
        if (images_key in arrays) != (labels_key in arrays):
            raise CohortInputError(f"{path}: has only one of {images_key} and {labels_key}; give both or neither")
        if images_key in arrays:
            extra[split] = to_labeled_images(arrays[images_key], arrays[labels_key], max_value, f"{path} {split}")
            if extra[split].input_shape != train.input_shape:
                raise CohortInputError(
                    f"{path}: {split} images are {extra[split].input_shape[1:]} but train images are "
                    f"{train.input_shape[1:]}; every split needs the same image shape"
                )
    if "val" in extra:
        train = LabeledImages(
            np.concatenate([train.images, extra["val"].images]),
            np.concatenate([train.labels, extra["val"].labels]),
        )
    test = extra.get("test")
    labels = [train.labels] + ([test.labels] if test is not None else [])
    return DatasetSplits(train=train, test=test, num_classes=int(max(int(part.max()) for part in labels)) + 1)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CohortInputError(f"{path}: not a readable .npz file ({error}); re-export it with numpy.savez") from None
