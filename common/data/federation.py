"""Who holds which data: the server's held-out test set and each site's train/val split.

In simulation every process derives the same split from the same seed, so no data ever
crosses a Flower message. In deployment a site reads only its own data path and splits it
with its own seed and validation share, never the run config's.

A site's privacy budget belongs to its data, so the data's identity is the hash of all of
it, before any split: no seed, validation share or other run setting can make the same
examples look like a new dataset with a fresh budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.model_selection import train_test_split

from common.config import DataConfig
from common.data.canaries import Canaries, draw_canaries
from common.data.dataset import DatasetSplits, LabeledImages
from common.data.loading import load_dataset
from common.data.partition import partition_indices
from common.errors import CohortInputError
from common.privacy.ledger import sha256_hex


@dataclass(frozen=True)
class SiteData:
    """One site's local data: what it trains on and what it validates on."""

    train: LabeledImages
    val: LabeledImages
    num_classes: int
    identity: str


@dataclass(frozen=True)
class FederatedSplit:
    """The training pool the sites share out, the server's held-out test set, and the
    audit's canaries (None unless the run asks for an empirical privacy audit)."""

    pool: LabeledImages
    test: LabeledImages
    num_classes: int
    canaries: Canaries | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.pool.input_shape


@lru_cache(maxsize=4)
def federated_split(config: DataConfig) -> FederatedSplit:
    """The dataset's own test split if it has one, else a stratified held-out share."""
    split = split_off_test(load_dataset(config.dataset), config)
    if not config.audit_canaries:
        return split
    canaries, test = draw_canaries(split.test, split.num_classes, config.audit_canaries, config.seed)
    return FederatedSplit(pool=split.pool, test=test, num_classes=split.num_classes, canaries=canaries)


def split_off_test(data: DatasetSplits, config: DataConfig) -> FederatedSplit:
    if data.test is not None:
        return FederatedSplit(pool=data.train, test=data.test, num_classes=data.num_classes)
    indices = np.arange(len(data.train))
    counts = np.bincount(data.train.labels)
    stratify = data.train.labels if counts[counts > 0].min() >= 2 else None
    pool, test = train_test_split(indices, test_size=config.test_fraction, random_state=config.seed, stratify=stratify)
    return FederatedSplit(pool=data.train.subset(pool), test=data.train.subset(test), num_classes=data.num_classes)


@lru_cache(maxsize=64)
def simulated_site_data(config: DataConfig, partition_id: int, num_partitions: int) -> SiteData:
    split = federated_split(config)
    parts = partition_indices(split.pool.labels, num_partitions, config)
    if not 0 <= partition_id < num_partitions:
        raise CohortInputError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    site = split_train_val(split.pool.subset(parts[partition_id]), split.num_classes, config.val_fraction, config.seed + partition_id)
    if split.canaries is None or partition_id != config.audit_canary_site:
        return site
    train = site.train.concat(split.canaries.trained_on)
    return SiteData(train=train, val=site.val, num_classes=site.num_classes, identity=data_identity(train.concat(site.val)))


def local_site_data(data_path: str, seed: int, val_fraction: float) -> SiteData:
    """A deployed site's own data: all of it is the site's, split into train and val with
    the site's own seed and share, so the split is the same in every run."""
    data = load_dataset(data_path)
    pool = data.train
    if data.test is not None:
        pool = LabeledImages(np.concatenate([pool.images, data.test.images]), np.concatenate([pool.labels, data.test.labels]))
    return split_train_val(pool, data.num_classes, val_fraction, seed)


def data_identity(data: LabeledImages) -> str:
    """SHA-256 of every example and label, in the order the site holds them."""
    return sha256_hex(np.ascontiguousarray(data.images).tobytes(), np.ascontiguousarray(data.labels).tobytes())


def split_train_val(data: LabeledImages, num_classes: int, val_fraction: float, seed: int) -> SiteData:
    if len(data) < 2:
        raise CohortInputError(
            f"a site holds {len(data)} example(s); it needs at least 2 (one to train, one to validate); "
            "use fewer sites or more data"
        )
    val_size = min(len(data) - 1, max(1, round(len(data) * val_fraction)))
    train, val = train_test_split(np.arange(len(data)), test_size=val_size, random_state=seed)
    return SiteData(train=data.subset(train), val=data.subset(val), num_classes=num_classes, identity=data_identity(data))
