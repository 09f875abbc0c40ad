"""DP-SGD step time over non-private step time, per model and Opacus grad_sample_mode.

Each repetition times every variant once, in a shuffled order, so that machine noise
hits all of them alike; the figure is the ratio of medians over the repetitions.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from typing import Any, Callable

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from common.models.registry import build_model

SHAPES = {"digits 8x8": (1, 8, 8), "mnist 28x28": (1, 28, 28)}
# Every mode Opacus has, including 'ew', which Cohort does not offer (it fails on the
# empty batches of Poisson sampling) but which is worth knowing the speed of.
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")


def _step_fn(model_name: str, shape: tuple[int, int, int], mode: str | None, batch_size: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model(model_name, shape, 10)
    images, labels = torch.randn(batch_size, *shape), torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion: Any = torch.nn.CrossEntropyLoss()
    if mode is not None:
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
        private = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
        )
        model, optimizer = private[0], private[1]
        if mode == "ghost":
            criterion = private[2]

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(images), labels).backward()
        optimizer.step()

    return step


def _seconds_per_step(step: Callable[[], None], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def measure(model_name: str, shape: tuple[int, int, int], batch_size: int = 64, repetitions: int = 7, steps: int = 10) -> dict[str, Any]:
    variants: dict[str, Callable[[], None]] = {"non-private": _step_fn(model_name, shape, None, batch_size)}
    failures: dict[str, str] = {}
    for mode in OPACUS_MODES:
        try:
            variants[mode] = _step_fn(model_name, shape, mode, batch_size)
            variants[mode]()
        except Exception as error:  # a mode Opacus cannot apply to this model is reported, not fatal
            variants.pop(mode, None)
            failures[mode] = f"{type(error).__name__}: {error}"[:160]
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for name, step in variants.items():
        _seconds_per_step(step, 2)  # warm-up
    for _ in range(repetitions):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            timings[name].append(_seconds_per_step(variants[name], steps))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    base = medians["non-private"]
    return {
        "model": model_name,
        "input": list(shape),
        "batch_size": batch_size,
        "ms_per_step": {name: round(1000 * value, 3) for name, value in medians.items()},
        "ratio_to_non_private": {name: round(value / base, 2) for name, value in medians.items() if name != "non-private"},
        "failed_modes": failures,
    }


def run() -> list[dict[str, Any]]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    return [measure(model, shape) for model in ("cnn", "transformer") for shape in SHAPES.values()]


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
