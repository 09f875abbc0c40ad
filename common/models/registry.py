"""Build a model by name, identically on the server and on every site."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.errors import CohortInputError
from common.models.cnn import CNN
from common.models.transformer import PatchTransformer


@dataclass(frozen=True)
class ModelSpec:
    """factory: builds the module from (input_shape, num_classes).
    grad_sample_mode: the fastest Opacus per-sample gradient mode that gives the same
        update as 'hooks' for this model and survives empty Poisson batches, as measured
        by benchmarks/dp_step_time.py.
    """

    factory: Callable[[tuple[int, int, int], int], nn.Module]
    grad_sample_mode: str


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "cnn": ModelSpec(CNN, grad_sample_mode="ghost"),
    # Opacus' ghost clipping fails on this model's attention ("view size is not compatible").
    "transformer": ModelSpec(PatchTransformer, grad_sample_mode="hooks"),
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    try:
        return _spec(name).factory(input_shape, num_classes)
    except ValueError as error:
        raise CohortInputError(f"model '{name}' cannot take this data: {error}") from None


def grad_sample_mode_for(name: str, configured: str) -> str:
    """The configured mode, or the model's own fastest correct one for 'auto'."""
    return _spec(name).grad_sample_mode if configured == "auto" else configured


def _spec(name: str) -> ModelSpec:
    if name not in MODEL_REGISTRY:
        raise CohortInputError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]
