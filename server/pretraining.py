"""The initial global model, trained on public data before round 1.

Under DP the sites' noise is what costs accuracy, and a model that starts from features
learnt on public data needs far fewer noisy steps to fit: public pretraining is how the
DP literature closes most of its gap (Tramèr & Boneh, ICLR 2021, section 5; De et al.
2022; Kurakin et al. 2022). The coordinator trains on data that belong to no site,
without DP: no site spends budget on it, and no site's guarantee depends on the initial
model, which the coordinator chooses in any case.
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
import torch
from flwr.common.logger import log
from torch import nn

from common.data.dataset import LabeledImages
from common.data.loading import load_dataset
from common.errors import CohortInputError
from server.held_out import federated_split
from server.run_config import PretrainingConfig, RunConfig

BATCH_SIZE = 64
LEARNING_RATE = 1e-3  # Adam's own default: pretraining is plain non-private training
# Where the digit lies in a public set's images, for the sets that frame it apart from the
# image's edge: MNIST's digits are size-normalised into the central 20x20 of 28x28, where
# scikit-learn's digits fill their frame. Cropping first gives the shrunk images the
# federation's framing (docs/benchmarks.md measures the difference).
CONTENT_BOXES: dict[str, tuple[slice, slice]] = {"mnist-5k": (slice(4, 24), slice(4, 24))}


def check_public_dataset(run: RunConfig) -> None:
    """Refuse, before a run is started or submitted, a public dataset its ServerApp could not
    pretrain on: other classes or channels than the run's data show only once both load."""
    if run.pretrains:
        split = federated_split(run.data)
        public_images(run.pretraining, split.input_shape, split.num_classes)


def public_images(config: PretrainingConfig, input_shape: tuple[int, int, int], num_classes: int) -> LabeledImages:
    """Every image of the public dataset, cropped to its content box and resized to the run's images."""
    data = load_dataset(config.pretrain_dataset)
    if data.num_classes != num_classes:
        raise CohortInputError(
            f"pretrain-dataset '{config.pretrain_dataset}' has {data.num_classes} classes and the run's data "
            f'{num_classes}; pretrain on a public dataset of the same classes, or set pretrain-dataset = ""'
        )
    public = data.train if data.test is None else data.train.concat(data.test)
    images = public.images
    if images.shape[1] != input_shape[0]:
        raise CohortInputError(
            f"pretrain-dataset '{config.pretrain_dataset}' has {images.shape[1]} channel(s) and the run's images "
            f'{input_shape[0]}; pretrain on images with as many channels, or set pretrain-dataset = ""'
        )
    rows, columns = CONTENT_BOXES.get(config.pretrain_dataset, (slice(None), slice(None)))
    cropped = torch.from_numpy(np.ascontiguousarray(images[:, :, rows, columns]))
    resized = nn.functional.interpolate(cropped, size=input_shape[1:], mode="area")
    return LabeledImages(resized.numpy(), public.labels)


def pretrain(
    model: nn.Module, config: PretrainingConfig, input_shape: tuple[int, int, int], num_classes: int, seed: int
) -> None:
    """Train `model` in place on the public data, in an order drawn from `seed`."""
    started = time.monotonic()
    public = public_images(config, input_shape, num_classes)
    images, labels = torch.from_numpy(public.images), torch.from_numpy(public.labels)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    threads = torch.get_num_threads()
    # One thread sums in one order: the same seed pretrains the same model on a laptop and
    # on a 64-core coordinator, and the runs after it stay the same run.
    torch.set_num_threads(1)
    try:
        for _ in range(config.pretrain_epochs):
            for batch in torch.randperm(len(labels), generator=order).split(BATCH_SIZE):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    log(
        INFO,
        "Pretrained the initial model on %s: %d images, %d epochs, %.0f s",
        config.pretrain_dataset,
        len(labels),
        config.pretrain_epochs,
        time.monotonic() - started,
    )
