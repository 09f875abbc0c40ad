"""The audit's gradient ("Dirac") canaries in a simulated canary site's local training.

Each canary is an example whose gradient is one coordinate direction of the model at
GRADIENT_SCALE times the clip norm C, whatever the weights (server/canaries.py draws the
coordinates). It joins a step as an example would: with the step's sampling rate, and
under DP-SGD as one more per-sample gradient, which Opacus clips to C, sums and noises
with the others'; without DP its gradient enters the batch's mean unclipped, as any
example's would. Being larger than C, it tests the clipping too: unclipped, it shows. Only a
simulated canary site holds them (client.site_data); a deployed site's data never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.privacy.noise import NoiseSource

# An example's gradient may be any size; DP-SGD clips it to C. This one is well above C, as
# Nasr et al.'s Dirac canaries are, so that it stands out wherever nothing clips it.
GRADIENT_SCALE = 10.0


@dataclass(frozen=True)
class GradientCanaries:
    """coordinates: indices into the trainable parameters flattened in order; clip_norm: C."""

    coordinates: np.ndarray
    clip_norm: float

    def join(
        self, parameters: Sequence[torch.Tensor], source: NoiseSource, rate: float, batch: int, per_sample: bool
    ) -> None:
        """Add the canaries this step samples (each with probability `rate`) to the step's
        gradients: as rows of each parameter's `grad_sample` (DP-SGD), or into the mean
        gradient of a plain batch of `batch` examples."""
        chosen = self.coordinates[source.uniform(len(self.coordinates)).numpy() < rate]
        if per_sample:
            for parameter, rows in zip(parameters, self._rows(parameters, chosen), strict=True):
                # Opacus keeps per-sample gradients in an attribute it adds to each parameter.
                parameter.__dict__["grad_sample"] = torch.cat([parameter.__dict__["grad_sample"], rows])
        elif len(chosen):
            for parameter, rows in zip(parameters, self._rows(parameters, chosen), strict=True):
                assert parameter.grad is not None  # the batch's backward pass set it
                parameter.grad = (parameter.grad * batch + rows.sum(dim=0)) / (batch + len(chosen))

    def _rows(self, parameters: Sequence[torch.Tensor], chosen: np.ndarray) -> list[torch.Tensor]:
        """Each parameter's share of the chosen canaries' gradients: one row per canary."""
        rows = []
        start = 0
        for parameter in parameters:
            flat = torch.zeros((len(chosen), parameter.numel()), dtype=parameter.dtype, device=parameter.device)
            inside = np.flatnonzero((chosen >= start) & (chosen < start + parameter.numel()))
            flat[inside, chosen[inside] - start] = self.clip_norm * GRADIENT_SCALE
            rows.append(flat.view(len(chosen), *parameter.shape))
            start += parameter.numel()
        return rows
