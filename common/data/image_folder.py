"""User data as a folder of images with one subfolder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data.dataset import DatasetSplits, to_labeled_images
from common.errors import CohortInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def load_image_folder(path: Path) -> DatasetSplits:
    """Classes are the sorted subfolder names; every image is resized to the first one's size.

    Greyscale stays one channel; if any image has colour, all are read as RGB.
    """
    from PIL import Image, UnidentifiedImageError

    classes = sorted(child for child in path.iterdir() if child.is_dir())
    files = [
        (f, label)
        for label, folder in enumerate(classes)
        for f in sorted(folder.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise CohortInputError(f"{path}: no images found; put them in one subfolder per class (e.g. {path}/cat/1.png)")
    try:
        opened = [Image.open(f) for f, _ in files]
    except (UnidentifiedImageError, OSError) as error:
        raise CohortInputError(f"{path}: an image cannot be read ({error}); remove or fix it") from None
    mode = "L" if all(image.mode in ("1", "L", "I", "I;16") for image in opened) else "RGB"
    size = opened[0].size
    pixels = np.stack([np.asarray(image.convert(mode).resize(size)) for image in opened])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return DatasetSplits(train=to_labeled_images(pixels, labels, 255.0, str(path)), test=None, num_classes=len(classes))
