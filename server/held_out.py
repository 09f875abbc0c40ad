"""The coordinator's data: its held-out test set, and the pool a simulation shares out.

The server scores the global model on the dataset's own test split if it has one, else on
a stratified share held out by the run's seed. An empirical privacy audit takes its
canaries out of that test split (server/canaries.py), so that they never score the model.
Everything here derives from the run's data settings and seed alone, so every process of
a run (the command, the ServerApp, the audit afterwards) derives the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.model_selection import train_test_split

from common.data.dataset import DatasetSplits, LabeledImages
from common.data.loading import load_dataset
from common.models.registry import build_model
from server.canaries import Canaries, GradientCanaries, draw_canaries, draw_gradient_canaries
from server.run_config import DataConfig, RunConfig


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
    if not config.audit_canaries or config.audit_canary_kind != "input":
        return split
    canaries, test = draw_canaries(split.test, split.num_classes, config.audit_canaries, config.seed)
    return FederatedSplit(pool=split.pool, test=test, num_classes=split.num_classes, canaries=canaries)


def gradient_canaries(run: RunConfig) -> GradientCanaries | None:
    """The run's gradient canaries (None unless it audits with audit-canary-kind = 'dirac')."""
    if not run.data.audit_canaries or run.data.audit_canary_kind != "dirac":
        return None
    split = federated_split(run.data)
    model = build_model(run.training.model, split.input_shape, split.num_classes)
    return draw_gradient_canaries(model, run.data.audit_canaries, run.data.seed)


def split_off_test(data: DatasetSplits, config: DataConfig) -> FederatedSplit:
    if data.test is not None:
        return FederatedSplit(pool=data.train, test=data.test, num_classes=data.num_classes)
    indices = np.arange(len(data.train))
    counts = np.bincount(data.train.labels)
    stratify = data.train.labels if counts[counts > 0].min() >= 2 else None
    pool, test = train_test_split(indices, test_size=config.test_fraction, random_state=config.seed, stratify=stratify)
    return FederatedSplit(pool=data.train.subset(pool), test=data.train.subset(test), num_classes=data.num_classes)
