"""A model update as the one flat vector secure aggregation masks: every array of the global
model, in the order its ArrayRecord holds them, flattened row-major, as float64. The site
flattens (trained - global) this way and the coordinator adds the unmasked mean back the
same way, so the order is one fact with one owner."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def dimension(global_arrays: ArrayRecord) -> int:
    """d: the number of model parameters."""
    return sum(int(np.prod(array.shape)) for array in global_arrays.values())


def update_vector(trained: ArrayRecord, global_arrays: ArrayRecord) -> np.ndarray:
    """(trained - global), flat."""
    return np.concatenate(
        [
            (trained[name].numpy().astype(np.float64) - array.numpy().astype(np.float64)).ravel()
            for name, array in global_arrays.items()
        ]
    )


def plus_vector(global_arrays: ArrayRecord, vector: np.ndarray) -> ArrayRecord:
    """global + vector, each array back in its own shape and dtype."""
    arrays, start = {}, 0
    for name, array in global_arrays.items():
        values = array.numpy()
        arrays[name] = Array(
            (values.astype(np.float64) + vector[start : start + values.size].reshape(values.shape)).astype(values.dtype)
        )
        start += values.size
    return ArrayRecord(arrays)
