"""User data as MNIST IDX files (train-images-idx3-ubyte and friends, optionally .gz)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from common.data.dataset import DatasetSplits, LabeledImages, to_labeled_images
from common.errors import CohortInputError

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def is_idx_folder(path: Path) -> bool:
    return path.is_dir() and _find(path, _SPLITS["train"][0]) is not None


def load_idx_folder(path: Path) -> DatasetSplits:
    """Load the train pair (required) and the t10k test pair (optional) from one folder."""
    splits: dict[str, LabeledImages] = {}
    for split, (images_name, labels_name) in _SPLITS.items():
        images_file, labels_file = _find(path, images_name), _find(path, labels_name)
        if images_file is None and labels_file is None and split == "test":
            continue
        if images_file is None or labels_file is None:
            missing = images_name if images_file is None else labels_name
            raise CohortInputError(f"{path}: {missing} is missing; an IDX folder needs both images and labels files")
        splits[split] = to_labeled_images(read_idx(images_file), read_idx(labels_file), 255.0, str(images_file))
    test = splits.get("test")
    labels = [splits["train"].labels] + ([test.labels] if test is not None else [])
    return DatasetSplits(train=splits["train"], test=test, num_classes=int(max(int(part.max()) for part in labels)) + 1)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: two zero bytes, a type code, the rank, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise CohortInputError(f"{path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CohortInputError(f"{path}: not an IDX file (bad magic number)")
    rank = raw[3]
    header_end = 4 + 4 * rank
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise CohortInputError(f"{path}: truncated IDX file ({len(raw) - header_end} data bytes, {expected} expected)")
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None
