"""`cohort compare RUN_A RUN_B`: per site, what one run's model gives against another's.

Made for twins: the DP run against its no-DP baseline shows DP's share of the
disparity across sites, and which sites DP costs more than it costs the median site.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cli.errors import input_errors
from cli.terminal import labelled
from common.errors import CohortInputError
from server.rundir import RunDirectory

console = Console()


def compare(
    run_a: Annotated[Path, typer.Argument(help="A finished simulation run directory (e.g. the DP run).")],
    run_b: Annotated[Path, typer.Argument(help="Its twin on the same data and sites (e.g. the no-DP run).")],
) -> None:
    """Per-site accuracy of two runs' final models, and the sites A costs the most."""
    with input_errors():
        _require_twins(run_a, run_b)
        from simulations.fairness import (
            read_fairness,
            write_fairness,
        )  # loads torch: once the runs are known to compare

        reports = [
            read_fairness(run) or write_fairness(run, RunDirectory(run).read_config().fairness_margin)
            for run in (run_a, run_b)
        ]
        rows = compare_sites(reports[0], reports[1])
    console.print(f"{labelled('A', run_a)}\n{labelled('B', run_b)}", highlight=False, markup=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("site", "A", "B", "A - B", ""):
        table.add_column(column, justify="left" if column in ("site", "") else "right", no_wrap=column != "site")
    for row in rows:
        table.add_row(
            row["site"],
            f"{row['a']:.3f}",
            f"{row['b']:.3f}",
            f"{row['difference']:+.3f}",
            "costs more" if row["costs_more"] else "",
        )
    console.print(table)
    differences = [row["difference"] for row in rows]
    console.print(
        f"median A - B {statistics.median(differences):+.3f}; 'costs more': A loses more there than at the median site",
        highlight=False,
    )


def compare_sites(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site: accuracy under A and B, A - B, and whether A costs it more than the median."""
    if set(a["sites"]) != set(b["sites"]):
        raise CohortInputError(
            f"the runs have different sites ({', '.join(sorted(a['sites']))} "
            f"against {', '.join(sorted(b['sites']))}); compare twins"
        )
    differences = {name: a["sites"][name]["accuracy"] - b["sites"][name]["accuracy"] for name in sorted(a["sites"])}
    median = statistics.median(differences.values())
    return [
        {
            "site": name,
            "a": a["sites"][name]["accuracy"],
            "b": b["sites"][name]["accuracy"],
            "difference": gap,
            "costs_more": gap < median,
        }
        for name, gap in differences.items()
    ]


def _require_twins(run_a: Path, run_b: Path) -> None:
    """Per-site figures compare only when both runs split the same data the same way."""
    a, b = (dataclasses.asdict(RunDirectory(run).read_config().data) for run in (run_a, run_b))
    differences = [f"{name.replace('_', '-')} {a[name]!r} against {b[name]!r}" for name in a if a[name] != b[name]]
    if differences:
        raise CohortInputError(
            f"{run_a} and {run_b} use different data or splits ({', '.join(differences)}); "
            "compare runs of the same dataset, partitioner and seed"
        )
