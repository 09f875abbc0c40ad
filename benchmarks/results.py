"""Where benchmarks write, the way each table script runs on its own, and how a table
shows a figure measured over several seeds."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

Result = TypeVar("Result")

RESULTS = Path(__file__).resolve().parent / "results"
# Each seed draws a run's split, partition, initial model and DP noise (`--set seed=S`).
SEEDS = (42, 43, 44)


def run_table(
    name: str, run: Callable[[Path], list[dict[str, Any]]], markdown: Callable[[list[dict[str, Any]]], str]
) -> None:
    """Run one benchmark's simulations, keep its rows as results/NAME.json and print the
    markdown table that docs/benchmarks.md quotes."""
    RESULTS.mkdir(exist_ok=True)
    rows = run(RESULTS / f"{name}-runs")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


def in_parallel(run: Callable[..., Result], planned: list[tuple[Any, ...]], jobs: int) -> Iterator[Result]:
    """Each planned run's result, in the plan's order, `jobs` runs at a time. Threads are
    enough: each run is a `cohort simulate` process, and a thread only waits for it."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(lambda arguments: run(*arguments), planned)


def mean_and_range(values: list[float]) -> str:
    """A figure over seeds as the tables print it: the mean, then (min-max) when there are several."""
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def by_row(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each row (its seeds), rows in the order they were run."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        rows.setdefault(result["row"], []).append(result)
    return rows


def seeds_of(results: list[dict[str, Any]]) -> str:
    return ", ".join(str(seed) for seed in sorted({result["seed"] for result in results}))


def add_seeds_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=SEEDS,
        help=f"one run per seed in every row (default {','.join(map(str, SEEDS))})",
    )


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(seed) for seed in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integer seeds; write e.g. 42,43,44") from None
