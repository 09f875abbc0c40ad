"""A DP bug to inject into an in-process simulation (simulations.in_process), to show that
the empirical audit catches one: every site draws a share of the Gaussian noise its DP-SGD
asks for, and under client-level DP the coordinator a share of the noise its DP wrapper
asks for, while each plans, records and accounts the full noise.

For tests and benchmarks only: it swaps the noise sources of the ClientApp and the
ServerApp loaded in this process, which neither a Flower simulation's workers and
ServerApp process nor a deployed site ever run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import client.app
import server.app
from client.dp_randomness import site_noise_source
from common.privacy.noise import NoiseSource
from server.central_dp import coordinator_noise


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
    """Within: every in-process site, and the in-process coordinator, adds `share` of the
    noise it planned and records."""
    # The ClientApp and the ServerApp call their noise sources by the names they imported.
    sites, coordinator = vars(client.app), vars(server.app)
    sites["site_noise_source"] = lambda *args, **kwargs: QuietNoise(site_noise_source(*args, **kwargs), share)
    coordinator["coordinator_noise"] = lambda run: (
        lambda server_round: QuietNoise(coordinator_noise(run)(server_round), share)
    )
    try:
        yield
    finally:
        sites["site_noise_source"] = site_noise_source
        coordinator["coordinator_noise"] = coordinator_noise
