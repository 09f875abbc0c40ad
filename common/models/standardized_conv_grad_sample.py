"""Opacus' per-sample gradients for StandardizedConv2d, registered when this module is
imported (as Opacus registers its own rules): by client/training.py, before it wraps a
model, and by anything else that trains one of Cohort's models with Opacus.

Opacus has no per-sample rule for the layer and PyTorch's expanded weights ('ew') cannot
differentiate the standardisation, so the rule is here: the gradient with respect to the
standardised weights is what Opacus computes for nn.Conv2d, and the standardisation is one
linear map per filter, the same for every example, so each example's gradient is that
map's transpose applied to its own. 'hooks' and 'ghost' use it; 'functorch'
differentiates the forward pass itself, as Opacus' hooks also do for a layer they have no
rule for.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.utils import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d

from common.models.weight_standardization import EPSILON, StandardizedConv2d


@register_grad_sampler(StandardizedConv2d)
def standardized_conv_grad_sample(
    layer: StandardizedConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    inputs = activations[0].to(backprops.dtype)
    batch = len(inputs)
    if batch == 0:  # as Opacus' own rule for nn.Conv2d answers an empty batch
        return {
            p: torch.zeros_like(p).unsqueeze(0) for p in (layer.weight, layer.bias) if p is not None and p.requires_grad
        }
    columns = unfold2d(
        inputs, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation
    )
    backprops = backprops.reshape(batch, layer.out_channels, -1)
    samples: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        # d loss / d standardised weights, (batch, filters, fan-in), then through the map:
        # with w_hat = (w - mean) / s, the transpose takes g to (g - mean(g) - w_hat mean(g w_hat)) / s.
        grads = torch.einsum("nol,npl->nop", backprops, columns)
        flat = layer.weight.detach().reshape(layer.out_channels, -1)
        scale = torch.sqrt(flat.var(dim=1, unbiased=False, keepdim=True) + EPSILON)
        standard = (flat - flat.mean(dim=1, keepdim=True)) / scale
        grads = (
            grads - grads.mean(dim=2, keepdim=True) - standard * (grads * standard).mean(dim=2, keepdim=True)
        ) / scale
        samples[layer.weight] = grads.reshape(batch, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        samples[layer.bias] = backprops.sum(dim=2)
    return samples
