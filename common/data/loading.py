"""Resolve a dataset setting (a built-in name or a path) to loaded data."""

from __future__ import annotations

from pathlib import Path

from common.data.builtin import BUILTIN_DATASETS
from common.data.dataset import DatasetSplits
from common.data.idx import is_idx_folder, load_idx_folder
from common.data.image_folder import is_image_folder, load_image_folder
from common.data.npz import load_npz
from common.errors import CohortInputError


def load_dataset(spec: str) -> DatasetSplits:
    if spec in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[spec]()
    path = Path(spec).expanduser()
    if not path.exists():
        raise CohortInputError(
            f"unknown dataset '{spec}': it is neither a built-in ({', '.join(BUILTIN_DATASETS)}) "
            "nor an existing path; check the name or the path"
        )
    if path.is_file() and path.suffix == ".npz":
        return load_npz(path)
    if is_idx_folder(path):
        return load_idx_folder(path)
    if is_image_folder(path):
        return load_image_folder(path)
    raise CohortInputError(
        f"{path}: not a dataset Cohort reads; give an .npz (MedMNIST layout), a folder with "
        "MNIST IDX files, or a folder of images with one subfolder per class"
    )
