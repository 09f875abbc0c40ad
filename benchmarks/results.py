"""Where benchmarks write, and the way each table script runs on its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_table(
    name: str, run: Callable[[Path], list[dict[str, Any]]], markdown: Callable[[list[dict[str, Any]]], str]
) -> None:
    """Run one benchmark's simulations, keep its rows as results/NAME.json and print the
    markdown table that docs/benchmarks.md quotes."""
    RESULTS.mkdir(exist_ok=True)
    rows = run(RESULTS / f"{name}-runs")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
