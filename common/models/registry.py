"""Build a model by name, identically on the server and on every site."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.errors import CohortInputError
from common.models.cnn import CNN
from common.models.scatternet import ScatterNet
from common.models.transformer import PatchTransformer

ModelFactory = Callable[[tuple[int, int, int], int], nn.Module]

MODEL_REGISTRY: dict[str, ModelFactory] = {"cnn": CNN, "scatternet": ScatterNet, "transformer": PatchTransformer}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if name not in MODEL_REGISTRY:
        raise CohortInputError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_REGISTRY)}")
    try:
        return MODEL_REGISTRY[name](input_shape, num_classes)
    except ValueError as error:
        raise CohortInputError(f"model '{name}' cannot take this data: {error}") from None
