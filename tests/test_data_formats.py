"""Data: built-in sets load offline; user data in every supported format loads, and
malformed data is refused with a message that names the file and the fix."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.site_data import local_site_data
from common.data.loading import load_dataset
from common.errors import CohortInputError
from server.held_out import federated_split
from server.run_config import DataConfig
from tests.conftest import make_images


def test_digits_loads_offline_as_normalised_nchw() -> None:
    data = load_dataset("digits")
    assert data.train.images.shape == (1797, 1, 8, 8)
    assert data.num_classes == 10
    assert data.train.images.min() >= -1.0 and data.train.images.max() <= 1.0


def test_mnist_5k_loads_offline() -> None:
    data = load_dataset("mnist-5k")
    assert data.train.images.shape == (5000, 1, 28, 28)
    assert sorted(set(data.train.labels.tolist())) == list(range(10))


def test_held_out_test_set_is_stratified_and_disjoint_from_the_pool() -> None:
    split = federated_split(DataConfig(dataset="mnist-5k", test_fraction=0.2))
    assert len(split.test) == 1000 and len(split.pool) == 4000
    assert np.bincount(split.test.labels).min() >= 80  # every class present despite the label-sorted source


def test_medmnist_npz_keeps_its_own_test_split_and_pools_val_into_train(medmnist_npz: Path) -> None:
    data = load_dataset(str(medmnist_npz))
    assert len(data.train) == 140 and data.test is not None and len(data.test) == 40
    assert data.input_shape == (1, 8, 8)


def test_npz_with_missing_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(CohortInputError, match=r"missing key.*train_labels"):
        load_dataset(str(path))


def test_npz_with_more_images_than_labels_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(3, np.int64))
    with pytest.raises(CohortInputError, match="4 images but 3 labels"):
        load_dataset(str(path))


def test_npz_whose_splits_have_different_image_shapes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        train_images=np.zeros((4, 8, 8), np.uint8),
        train_labels=np.zeros(4, np.int64),
        test_images=np.zeros((2, 9, 9), np.uint8),
        test_labels=np.zeros(2, np.int64),
    )
    with pytest.raises(CohortInputError, match="same image shape"):
        load_dataset(str(path))


def test_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("not a zip")
    with pytest.raises(CohortInputError, match=r"not a readable \.npz"):
        load_dataset(str(path))


def test_missing_path_is_refused() -> None:
    with pytest.raises(CohortInputError, match=r"neither a built-in .* nor an existing path"):
        load_dataset("/no/such/data.npz")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(
        gzip.compress(header + array.astype(np.uint8).tobytes())
        if path.suffix == ".gz"
        else header + array.astype(np.uint8).tobytes()
    )


def test_mnist_idx_folder_loads_plain_and_gzipped_files(tmp_path: Path) -> None:
    images, labels = make_images(30, size=8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    data = load_dataset(str(tmp_path))
    assert data.train.images.shape == (30, 1, 8, 8)
    assert np.array_equal(data.train.labels, labels)
    assert data.test is None


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    images, labels = make_images(30, size=8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    truncated = (tmp_path / "train-images-idx3-ubyte").read_bytes()[:-10]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(truncated)
    with pytest.raises(CohortInputError, match="truncated IDX file"):
        load_dataset(str(tmp_path))


def test_image_folder_with_one_subfolder_per_class_loads(tmp_path: Path) -> None:
    images, labels = make_images(12, size=8, classes=3)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / f"class-{label}").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / f"class-{label}" / f"{index}.png")
    data = load_dataset(str(tmp_path))
    assert data.train.images.shape == (12, 1, 8, 8)
    assert data.num_classes == len(set(labels.tolist()))


def test_folder_of_unknown_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CohortInputError, match="not a dataset Cohort reads"):
        load_dataset(str(tmp_path))


def test_deployed_site_uses_all_of_its_own_data(medmnist_npz: Path) -> None:
    site = local_site_data(str(medmnist_npz), seed=0, val_fraction=0.1)
    assert len(site.train) + len(site.val) == 180
