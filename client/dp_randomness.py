"""Where a site's local training draws its randomness: which noise source, and the two
draws of DP-SGD that come from it (the Poisson batches and the Gaussian noise).

Opacus 1.6 draws both with PyTorch's generator (its only hook is a torch.Generator, and
none of those is a CSPRNG; its secure mode needs torchcsprng, which current PyTorch cannot
install). So the site takes both draws over: the batches here, at the sample rate Opacus
accounts, and the noise through the optimizer's own noise step, in every grad-sample mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from client.policy import SiteConfig
from client.site_data import SiteData
from common.config import SiteRunConfig
from common.privacy.noise import NoiseSource, SecureNoise, noise_source

Batch = tuple[torch.Tensor, torch.Tensor]


def site_noise_source(
    run: SiteRunConfig, site: SiteConfig, data: SiteData, server_round: int, *stream: str
) -> NoiseSource:
    """A deployed site always draws secure noise: this is the site's own code, and no run
    setting reaches the choice. A simulated site follows the run's noise-source, seeded by
    the run's seed (handed over with its data), its name and the round, and `stream` for a
    draw apart from its DP-SGD's."""
    if site.deployed or data.noise_seed is None:
        return SecureNoise()
    return noise_source(run.noise_source, data.noise_seed, site.name, server_round, *stream)


@dataclass(frozen=True)
class PoissonBatches:
    """Poisson sampling, as Opacus' sampler does it: in each of `steps` batches every
    example is in independently with probability `sample_rate`; a batch may be empty."""

    images: torch.Tensor
    labels: torch.Tensor
    sample_rate: float
    steps: int
    source: NoiseSource

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.steps):
            chosen = self.source.uniform(len(self.labels)) < self.sample_rate
            yield self.images[chosen], self.labels[chosen]


@dataclass(frozen=True)
class ShuffledBatches:
    """Non-private training's batches: a fresh random order each epoch, cut in batch_size."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    source: NoiseSource

    def __iter__(self) -> Iterator[Batch]:
        order = torch.argsort(self.source.uniform(len(self.labels)))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            yield self.images[chosen], self.labels[chosen]


def draw_noise_from(optimizer: DPOptimizer, source: NoiseSource) -> None:
    """Make `optimizer`'s noise step draw from `source`: one draw for all parameters.

    It replaces Opacus' `add_noise` on this optimizer alone (DPOptimizer's and ghost
    clipping's are the same loop) and keeps everything around it: the clipped sum, the
    check that no gradient is used twice, the scaling by the expected batch size and the
    accountant's step hook.
    """

    def add_noise() -> None:
        parameters = optimizer.params
        sizes = [p.numel() for p in parameters]
        noise = source.gaussian(sum(sizes), optimizer.noise_multiplier * optimizer.max_grad_norm)
        for parameter, values in zip(parameters, noise.to(parameters[0].summed_grad).split(sizes), strict=True):
            _check_processed_flag(parameter.summed_grad)
            summed = parameter.summed_grad
            parameter.grad = (summed + values.view_as(summed)).view_as(parameter)
            _mark_as_processed(summed)

    optimizer.add_noise = add_noise
