"""ScatterNet: fixed wavelet scattering features under a small trainable CNN.

Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better features") train
only a small network on a scattering transform (Oyallon & Mallat's, from kymatio): the
features cost no privacy, as no data chooses them, and the few parameters left take less
DP noise. Under DP-SGD at epsilon 8 it beat the cnn on both shipped image sets, most on
28x28 MNIST (docs/benchmarks.md, the ablation tables), so the DP simulations use it.
"""

from __future__ import annotations

import torch

# kymatio.torch would also load its 3-D scattering, whose filter bank imports a function
# SciPy 1.15 removed; the 2-D front end alone does not.
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from torch import nn

from common.models.weight_standardization import StandardizedConv2d

ORIENTATIONS = 8
# Per image size, the scales J of the transform (its features have 1/2**J of the image's
# resolution) and whether the head max-pools 2x2 neighbourhoods, each the best measured
# (docs/benchmarks.md): Tramèr & Boneh's J = 2 and a pooled head on 28x28 MNIST; the few
# positions of 8x8 digits keep more with J = 1 and no pooling.
LARGE_IMAGE_SIDE = 16
LARGE_IMAGE_SCALES, SMALL_IMAGE_SCALES = 2, 1
CHANNELS_PER_NORM_GROUP = 3  # Tramèr & Boneh's GroupNorm of 27 groups over 81 channels


def fixed_scattering(scales: int, shape: tuple[int, int]) -> nn.Module:
    """kymatio's transform with its filters kept out of the state dict: they are not
    parameters, so they never travel in the arrays a site and the coordinator exchange, and
    no reply can change them; every party builds the same filters from the code."""
    scattering = ScatteringTorch2D(J=scales, shape=shape, L=ORIENTATIONS)
    for name, filters in list(scattering.named_buffers(recurse=False)):
        scattering.register_buffer(name, filters, persistent=False)
    return scattering


class ScatterNet(nn.Module):
    """Scattering of every input channel, GroupNorm, one weight-standardised convolution
    (max-pooled on large images) and a linear head: 3,914 parameters on 8x8 digits, 13,162
    on 28x28 MNIST."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16) -> None:
        super().__init__()
        height, width_px = input_shape[1:]
        large = min(height, width_px) >= LARGE_IMAGE_SIDE
        scales = LARGE_IMAGE_SCALES if large else SMALL_IMAGE_SCALES
        if min(height, width_px) < 2**scales * 2:
            raise ValueError(f"images of {height}x{width_px} are too small for the scatternet; it needs at least 4x4")
        self.scattering = fixed_scattering(scales, (height, width_px))
        with torch.no_grad():
            features = self.scattering(torch.zeros(1, *input_shape)).flatten(1, 2)
        feature_channels = features.shape[1]
        self.norm = nn.GroupNorm(feature_channels // CHANNELS_PER_NORM_GROUP, feature_channels, affine=False)
        self.convolution = nn.Sequential(
            StandardizedConv2d(feature_channels, width, kernel_size=3, padding=1),
            nn.GroupNorm(num_groups=min(8, width), num_channels=width),
            nn.ReLU(),
            *([nn.MaxPool2d(2)] if large else []),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convolution(features).shape[1]
        self.head = nn.Linear(flat, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # fixed features: nothing upstream to differentiate
            features = self.scattering(images.contiguous()).flatten(1, 2)
        return self.head(self.convolution(self.norm(features)))
