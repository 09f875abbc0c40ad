"""Who holds which data: the server's held-out test set and each site's train/val split.

In simulation every process derives the same split from the same seed, so no data ever
crosses a Flower message. In deployment a site reads only its own data path and splits it
with its own seed and validation share, never the run config's.

A site's privacy budget belongs to its data, so the data's identity is the hash of all of
it, before any split: no seed, validation share or other run setting can make the same
examples look like a new dataset with a fresh budget.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from common.config import DataConfig
from common.data.canaries import Canaries, draw_canaries
from common.data.dataset import DatasetSplits, LabeledImages
from common.data.loading import load_dataset
from common.data.partition import partition_indices
from common.errors import CohortInputError
from common.privacy.ledger import sha256_hex
from common.rundir import RunDirectory, write_bytes_atomic


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


@lru_cache(maxsize=4)
def simulated_partitions(config: DataConfig, num_partitions: int, run_dir: str = "") -> tuple[np.ndarray, ...]:
    """Every site's pool indices, once per process: partitioning derives all partitions
    together, so a site that rebuilt them to read its own would pay for every site of the
    federation (seconds with a thousand). A simulation partitions once, in the process that
    starts it (write_partitions), and its site workers read that file in its run directory
    instead, which also spares each of them importing flwr-datasets."""
    saved = _read_partitions(RunDirectory(Path(run_dir)).partitions_file, config, num_partitions) if run_dir else None
    return saved if saved is not None else tuple(partition_indices(federated_split(config).pool.labels, num_partitions, config))


def write_partitions(config: DataConfig, num_partitions: int, run_dir: Path) -> None:
    """Save every site's indices in the run directory, with the data settings they were
    derived from."""
    parts = simulated_partitions(config, num_partitions)
    arrays = {f"site-{index}": indices for index, indices in enumerate(parts)}
    write_bytes_atomic(RunDirectory(run_dir).partitions_file, _npz_bytes(key=np.array(_partitions_key(config, num_partitions)), **arrays))


def _read_partitions(path: Path, config: DataConfig, num_partitions: int) -> tuple[np.ndarray, ...] | None:
    """The saved partitions, or None when there are none of these settings."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != _partitions_key(config, num_partitions):
                return None
            return tuple(saved[f"site-{index}"] for index in range(num_partitions))
    except (OSError, KeyError, ValueError):
        return None


def _partitions_key(config: DataConfig, num_partitions: int) -> str:
    return json.dumps({"data": dataclasses.asdict(config), "num-partitions": num_partitions}, sort_keys=True)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# Large enough for every site a simulation worker serves in a 1,000-site federation; all of
# them together hold one copy of the training pool.
SITE_DATA_CACHE_SIZE = 4096


@lru_cache(maxsize=SITE_DATA_CACHE_SIZE)
def simulated_site_data(config: DataConfig, partition_id: int, num_partitions: int, run_dir: str = "") -> SiteData:
    """run_dir: the simulation's run directory, where its partitions were saved
    (write_partitions); '' partitions here."""
    split = federated_split(config)
    if not 0 <= partition_id < num_partitions:
        raise CohortInputError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    parts = simulated_partitions(config, num_partitions, run_dir)
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
