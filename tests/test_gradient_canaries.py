"""The audit's gradient (Dirac) canaries in a site's step: one coordinate, clipped to C by
DP-SGD like any example's gradient, unclipped in plain SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.gradient_canaries import GRADIENT_SCALE, GradientCanaries
from client.training import empty_batch_gradients
from common.privacy.noise import SeededNoise

CLIP = 0.5
COORDINATE = 4  # the first layer's weight has 6 entries: this is one of them


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dp_sgd_clips_a_gradient_canary_to_the_clip_norm_along_its_coordinate() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), batch_size=4)
    module, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=CLIP,
        poisson_sampling=False,
    )
    before = _flat(model)
    empty_batch_gradients(optimizer)
    canaries = GradientCanaries(np.array([COORDINATE]), CLIP)
    canaries.join(list(module.parameters()), SeededNoise(0), rate=1.0, batch=0, per_sample=True)
    optimizer.step()
    moved = _flat(model) - before
    assert moved[COORDINATE].item() == pytest.approx(-CLIP / 4, rel=1e-5)  # lr * C / expected batch size
    assert torch.count_nonzero(moved) == 1


def test_without_dp_a_gradient_canary_enters_the_batch_mean_unclipped() -> None:
    model = nn.Linear(3, 2)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    GradientCanaries(np.array([COORDINATE]), CLIP).join(
        list(model.parameters()), SeededNoise(0), rate=1.0, batch=3, per_sample=False
    )
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[COORDINATE].item() == pytest.approx((3 + GRADIENT_SCALE * CLIP) / 4)
    assert torch.allclose(grads[np.arange(len(grads)) != COORDINATE], torch.tensor(0.75))


def test_a_canary_joins_a_step_at_the_rate_it_is_given() -> None:
    model = nn.Linear(3, 2)
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    canaries = GradientCanaries(np.arange(8), CLIP)
    canaries.join(parameters, SeededNoise(0), rate=0.0, batch=1, per_sample=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in parameters)
