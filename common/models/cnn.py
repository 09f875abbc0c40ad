"""A small convolutional network that Opacus can train without any module fixes."""

from __future__ import annotations

import torch
from torch import nn

from common.models.weight_standardization import StandardizedConv2d


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: BatchNorm mixes examples in a batch, which breaks
    # per-sample gradients, and ModuleValidator.fix would swap it (changing keys).
    # Weight-standardised filters before it, as De et al. (2022) train under DP-SGD.
    return nn.Sequential(
        StandardizedConv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(num_groups=min(8, out_channels), num_channels=out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class CNN(nn.Module):
    """Two conv blocks and a linear head; sized from the input, not from constants.

    Deliberately small (about 6k parameters on 8x8 digits, 20k on 28x28 MNIST): DP-SGD
    adds noise to every parameter, so at a site with a few hundred examples a smaller
    model learns more per unit of privacy. In tuning the default simulation, adding a
    hidden layer or doubling the width lowered held-out accuracy at epsilon 8, and so did
    tanh in place of ReLU (Papernot et al.'s tempered sigmoids), while weight
    standardisation raised it (docs/benchmarks.md, the ablation table).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(_conv_block(channels, width), _conv_block(width, 2 * width))
        flat = 2 * width * (height // 4) * (width_px // 4)
        if flat == 0:
            raise ValueError(f"images of {height}x{width_px} are too small for the cnn; it needs at least 4x4")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
