"""A DP bug to inject into an in-process simulation (simulations.in_process), to show that
the empirical audit catches one: every site draws a share of the Gaussian noise its DP-SGD
asks for, while it plans, records and accounts the full noise.

For tests and benchmarks only: it swaps the noise source of the ClientApp loaded in this
process, which neither a Flower simulation's workers nor a deployed site ever run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import client.app
from client.dp_randomness import site_noise_source
from common.privacy.noise import NoiseSource


@dataclass(frozen=True)
class QuietNoise:
    """Gaussian noise at `share` of the std asked for; every other draw as asked."""

    source: NoiseSource
    share: float

    @property
    def name(self) -> str:
        return self.source.name

    def gaussian(self, count: int, std: float) -> torch.Tensor:
        return self.source.gaussian(count, std * self.share)

    def uniform(self, count: int) -> torch.Tensor:
        return self.source.uniform(count)


@contextmanager
def noise_cut_to(share: float) -> Iterator[None]:
    """Within: every in-process site adds `share` of the noise it planned and records."""
    names = vars(client.app)  # the ClientApp calls the noise source by the name it imported
    names["site_noise_source"] = lambda *args, **kwargs: QuietNoise(site_noise_source(*args, **kwargs), share)
    try:
        yield
    finally:
        names["site_noise_source"] = site_noise_source
