"""DP-SGD step time over non-private step time, per model, input, batch size and Opacus
grad_sample_mode, with each step split into forward, backward and optimizer step.

    .venv/bin/python -m benchmarks.dp_step_time      # writes results/dp_step_time.json

One thread, as a simulated site trains (Ray sets OMP_NUM_THREADS=1). Times are the CPU
time of the measuring thread (`time.thread_time`), which runs the whole step with one
thread: time a shared machine gives to other processes does not count (contention for
caches and memory bandwidth still does). Each repetition times every variant once, in a
shuffled order, so that what noise is left hits all of them alike; the figures are
medians over the repetitions. Opacus 1.6's other modes do not
apply to a site: 'ghost_fsdp' needs a distributed FSDP model, 'no_op' does not clip.

The model's fastest mode (AUTO_GRAD_SAMPLE_MODE) also runs with the site's noise sources
in place of Opacus' own noise (client/dp_randomness.py): 'secure' (a deployed site's) and
'seeded' (a simulation's), so that their cost is a ratio measured in the same run.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.results import run_table
from client.dp_randomness import draw_noise_from
from common.config import AUTO_GRAD_SAMPLE_MODE, MODELS
from common.models import standardized_conv_grad_sample  # noqa: F401 (the rule Opacus' hooks use for the cnn)
from common.models.registry import build_model
from common.privacy.noise import NoiseSource, SecureNoise, SeededNoise

SHAPES = {"8x8": (1, 8, 8), "28x28": (1, 28, 28)}
# The DP-SGD batch sizes of AUTO_LOCAL_TRAINING: 256 with SGD (the default), 64 with Adam.
BATCH_SIZES = (64, 256)
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
PHASES = ("forward", "backward", "optimizer")
NOISE_SOURCES = ("secure", "seeded")

Step = Callable[[], tuple[float, float, float]]


def _step_fn(
    model_name: str, shape: tuple[int, int, int], mode: str | None, batch_size: int, noise: NoiseSource | None = None
) -> Step:
    torch.manual_seed(0)
    model = build_model(model_name, shape, 10)
    images, labels = torch.randn(batch_size, *shape), torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion: Any = torch.nn.CrossEntropyLoss()
    if mode is not None:
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
        private = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        model, optimizer = private[0], private[1]
        if mode == "ghost":
            criterion = private[2]
        if noise is not None:
            draw_noise_from(optimizer, noise)

    def step() -> tuple[float, float, float]:
        started = time.thread_time()
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        forward_done = time.thread_time()
        loss.backward()
        backward_done = time.thread_time()
        optimizer.step()
        return forward_done - started, backward_done - forward_done, time.thread_time() - backward_done

    return step


def _seconds_per_step(step: Step, steps: int) -> tuple[float, ...]:
    totals = [0.0, 0.0, 0.0]
    for _ in range(steps):
        for phase, seconds in enumerate(step()):
            totals[phase] += seconds
    return tuple(total / steps for total in totals)


def measure(
    model_name: str, shape: tuple[int, int, int], batch_size: int, repetitions: int = 7, steps: int = 5
) -> dict[str, Any]:
    variants: dict[str, Step] = {"non-private": _step_fn(model_name, shape, None, batch_size)}
    failures: dict[str, str] = {}
    for mode in OPACUS_MODES:
        try:
            variants[mode] = _step_fn(model_name, shape, mode, batch_size)
            variants[mode]()
        except Exception as error:  # noqa: BLE001 - a mode Opacus cannot apply to this model is reported, not fatal
            variants.pop(mode, None)
            failures[mode] = f"{type(error).__name__}: {error}"[:160]
    auto = AUTO_GRAD_SAMPLE_MODE[model_name]
    sources: dict[str, NoiseSource] = {"secure": SecureNoise(), "seeded": SeededNoise(0, "benchmark")}
    for name in NOISE_SOURCES:
        variants[f"{auto} {name}"] = _step_fn(model_name, shape, auto, batch_size, sources[name])
    timings: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}
    for step in variants.values():
        _seconds_per_step(step, 2)  # warm-up
    for _ in range(repetitions):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            timings[name].append(_seconds_per_step(variants[name], steps))
    medians = {name: statistics.median(sum(phases) for phases in values) for name, values in timings.items()}
    base = medians["non-private"]
    return {
        "model": model_name,
        "input": list(shape),
        "batch_size": batch_size,
        "ms_per_step": {name: round(1000 * value, 2) for name, value in medians.items()},
        "ms_per_phase": {
            name: {phase: round(1000 * statistics.median(p[i] for p in values), 2) for i, phase in enumerate(PHASES)}
            for name, values in timings.items()
        },
        "ratio_to_non_private": {
            name: round(value / base, 2) for name, value in medians.items() if name != "non-private"
        },
        "noise_cost": {name: _noise_cost(timings, medians, auto, f"{auto} {name}") for name in NOISE_SOURCES},
        "failed_modes": failures,
    }


def _noise_cost(
    timings: dict[str, list[tuple[float, ...]]], medians: dict[str, float], opacus: str, sourced: str
) -> dict[str, float]:
    """A noise source against Opacus' own noise in the same mode: the ratio of whole steps,
    and the time it adds to the optimizer step, the only phase it changes (the forward and
    backward passes run the same code, so what differs there is the machine's noise)."""
    optimizer_phase = {
        name: statistics.median(p[PHASES.index("optimizer")] for p in timings[name]) for name in (opacus, sourced)
    }
    added = optimizer_phase[sourced] - optimizer_phase[opacus]
    return {
        "step_ratio": round(medians[sourced] / medians[opacus], 3),
        "optimizer_ms_added": round(1000 * added, 2),
        "added_share_of_step": round(added / medians[opacus], 3),
    }


def run() -> list[dict[str, Any]]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    return [
        measure(model, shape, batch_size) for model in MODELS for shape in SHAPES.values() for batch_size in BATCH_SIZES
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The ratio table docs/benchmarks.md quotes, and where each variant's time goes."""
    lines = [
        "| model, input, batch | non-private ms/step | " + " | ".join(OPACUS_MODES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in OPACUS_MODES) + " |",
    ]
    for row in rows:
        ratios = [
            f"{row['ratio_to_non_private'][m]:.2f}x" if m in row["ratio_to_non_private"] else "fails"
            for m in OPACUS_MODES
        ]
        size = "x".join(str(n) for n in row["input"][1:])
        lines.append(
            f"| {row['model']}, {size}, {row['batch_size']} | {row['ms_per_step']['non-private']:.1f} | "
            + " | ".join(ratios)
            + " |"
        )
    lines += [
        "",
        "| model, input, batch | auto mode with Opacus' noise, ms/step | "
        + " | ".join(f"{name} noise: step ratio, optimizer +ms (share of step)" for name in NOISE_SOURCES)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in NOISE_SOURCES) + " |",
    ]
    for row in rows:
        size = "x".join(str(n) for n in row["input"][1:])
        auto = AUTO_GRAD_SAMPLE_MODE[row["model"]]
        costs = [row["noise_cost"][name] for name in NOISE_SOURCES]
        cells = [
            f"{c['step_ratio']:.2f}x, {c['optimizer_ms_added']:+.1f} ({100 * c['added_share_of_step']:+.0f}%)"
            for c in costs
        ]
        lines.append(
            f"| {row['model']}, {size}, {row['batch_size']} | {row['ms_per_step'][auto]:.1f} ({auto}) | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "| model, input, batch | variant | forward ms | backward ms | optimizer ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        size = "x".join(str(n) for n in row["input"][1:])
        for name in (
            "non-private",
            "hooks",
            AUTO_GRAD_SAMPLE_MODE[row["model"]],
            f"{AUTO_GRAD_SAMPLE_MODE[row['model']]} secure",
        ):
            phases = row["ms_per_phase"][name]
            lines.append(
                f"| {row['model']}, {size}, {row['batch_size']} | {name} | "
                + " | ".join(f"{phases[p]:.1f}" for p in PHASES)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    run_table("dp_step_time", lambda _runs: run(), markdown)
