"""A site's own data: what it trains on, what it validates on, and the identity its
budget belongs to.

A deployed site reads its data path (any format common.data.loading reads) and splits it
with its own seed and validation share, never the run config's. A simulated site reads
the one file the simulation wrote for it in the run directory (simulations/federation.py):
its share of the simulation's data, the audit's canaries at the canary site, and the split
the simulation gives it. It reads no other site's data and needs no code of the
simulation's: how the data was partitioned is not the site's business.

A site's privacy budget belongs to its data, so the data's identity is the hash of all of
it, before any split: no seed, validation share or other run setting can make the same
examples look like a new dataset with a fresh budget.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from common.data.dataset import LabeledImages
from common.data.loading import load_dataset
from common.errors import CohortInputError
from common.privacy.ledger import sha256_hex

# In a simulation's run directory: one file per simulated site, named by its partition id.
SIMULATED_SITE_DIR = "site-data"
# Large enough for every site a simulation worker serves in a 1,000-site federation; all of
# them together hold one copy of the training pool.
SITE_DATA_CACHE_SIZE = 4096


@dataclass(frozen=True)
class SiteData:
    """One site's local data: what it trains on and what it validates on.

    noise_seed: the seed a simulated site's seeded noise starts from, handed over with its
    data by the simulation (None at a deployed site, whose noise is never seeded).
    gradient_canaries: the coordinates of the audit's gradient canaries this simulated
        site trains on (client.gradient_canaries); None at every other site.
    """

    train: LabeledImages
    val: LabeledImages
    num_classes: int
    identity: str
    noise_seed: int | None = None
    gradient_canaries: np.ndarray | None = None


@dataclass(frozen=True)
class SimulatedHolding:
    """What a simulated site holds, as the simulation hands it over.

    examples: the site's share of the training pool, in the order the partition lists it.
    num_classes: the whole dataset's (a share may lack some classes; the model may not).
    val_fraction, split_seed: the site's train/validation split.
    noise_seed: the simulation's seed, from which the site's seeded noise starts (when the
        run asks for seeded noise: common.config.SiteRunConfig.noise_source).
    canaries: the audit's input canaries this site trains on (the canary site only), added
        to its training split after the split, so they never score its validation.
    gradient_canaries: the coordinates of the audit's gradient canaries it trains on (the
        canary site only).
    """

    examples: LabeledImages
    num_classes: int
    val_fraction: float
    split_seed: int
    noise_seed: int
    canaries: LabeledImages | None = None
    gradient_canaries: np.ndarray | None = None

    def site_data(self) -> SiteData:
        site = dataclasses.replace(
            split_train_val(self.examples, self.num_classes, self.val_fraction, self.split_seed),
            noise_seed=self.noise_seed,
            gradient_canaries=self.gradient_canaries,
        )
        if self.canaries is None:
            return site
        train = site.train.concat(self.canaries)
        return dataclasses.replace(site, train=train, identity=data_identity(train.concat(site.val)))

    def to_bytes(self) -> bytes:
        arrays = {
            "images": self.examples.images,
            "labels": self.examples.labels,
            "num_classes": np.array(self.num_classes),
            "val_fraction": np.array(self.val_fraction),
            "split_seed": np.array(self.split_seed),
            "noise_seed": np.array(self.noise_seed),
        }
        if self.canaries is not None:
            arrays.update(canary_images=self.canaries.images, canary_labels=self.canaries.labels)
        if self.gradient_canaries is not None:
            arrays.update(gradient_canaries=self.gradient_canaries)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path) -> SimulatedHolding:
        with np.load(path, allow_pickle=False) as saved:
            canaries = (
                LabeledImages(saved["canary_images"], saved["canary_labels"])
                if "canary_images" in saved.files
                else None
            )
            return cls(
                examples=LabeledImages(saved["images"], saved["labels"]),
                num_classes=int(saved["num_classes"]),
                val_fraction=float(saved["val_fraction"]),
                split_seed=int(saved["split_seed"]),
                noise_seed=int(saved["noise_seed"]),
                canaries=canaries,
                gradient_canaries=saved["gradient_canaries"] if "gradient_canaries" in saved.files else None,
            )


def simulated_site_file(run_dir: Path, partition_id: int) -> Path:
    """Where the simulation leaves simulated site `partition_id`'s data."""
    return run_dir / SIMULATED_SITE_DIR / f"site-{partition_id}.npz"


@lru_cache(maxsize=SITE_DATA_CACHE_SIZE)
def simulated_site_data(run_dir: str, partition_id: int) -> SiteData:
    """A simulated site's data, from its own file in the simulation's run directory."""
    path = simulated_site_file(Path(run_dir), partition_id)
    try:
        return SimulatedHolding.read(path).site_data()
    except FileNotFoundError:
        raise CohortInputError(
            f"simulated site {partition_id} finds no data at {path}: simulated sites read what `cohort simulate` "
            "writes into the run directory; start simulations with `cohort simulate`"
        ) from None


def local_site_data(data_path: str, seed: int, val_fraction: float) -> SiteData:
    """A deployed site's own data: all of it is the site's, split into train and val with
    the site's own seed and share, so the split is the same in every run."""
    data = load_dataset(data_path)
    pool = data.train if data.test is None else data.train.concat(data.test)
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
    return SiteData(
        train=data.subset(train), val=data.subset(val), num_classes=num_classes, identity=data_identity(data)
    )
