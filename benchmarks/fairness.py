"""Who DP costs most, and what narrows the gap between sites under DP: FedAvg with and
without DP beside q-FedAvg at several q, the server optimisers, weighting by examples and
the clip norm.

10 simulated sites on digits with Dirichlet alpha 0.3 (strong label skew), 20 rounds, each
run a real `cohort simulate` once per seed (`--set seed=S`: split, partition, initial
model and DP noise); the per-site figures are the fairness report's (the final global model
on each site's own validation split). A row's figures are means over its seeds, with the
range. Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python -m benchmarks.fairness                   # every row, seeds 42, 43, 44
    .venv/bin/python -m benchmarks.fairness --rows fedavg,qfedavg-q1 --seeds 42 --jobs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.results import SEEDS, add_seeds_option, by_row, in_parallel, mean_and_range, run_table, seeds_of
from benchmarks.simulations import run_simulation

ROUNDS = 20
FEDERATION = ("num-sites=10", "dirichlet-alpha=0.3", f"rounds={ROUNDS}")
# name -> (what it is, the simulation file, its settings on top of FEDERATION)
ROWS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fedavg": ("FedAvg, DP", "default.toml", ()),
    "fedavg-no-dp": ("FedAvg, no DP", "no-dp.toml", ()),
    "qfedavg": ("q-FedAvg q = 0.1 (as shipped), DP", "default.toml", ("strategy=qfedavg",)),
    "qfedavg-q1": ("q-FedAvg q = 1, DP", "default.toml", ("strategy=qfedavg", "qfedavg-q=1.0")),
    "qfedavg-q5": ("q-FedAvg q = 5, DP", "default.toml", ("strategy=qfedavg", "qfedavg-q=5.0")),
    "fedavgm": ("FedAvgM (server rate 0.1, momentum 0.9), DP", "default.toml", ("strategy=fedavgm",)),
    "fedadam": ("FedAdam (server rate 0.1), DP", "default.toml", ("strategy=fedadam",)),
    "by-examples": ("FedAvg weighted by examples, DP", "default.toml", ("aggregation-weight=examples",)),
    # Clipping is where DP-SGD's disparate impact starts (Bagdasaryan et al., NeurIPS 2019):
    # each row keeps clip-norm x learning-rate (2 as shipped), so an example's largest step
    # and the noise on the model stay the same and only how many examples are clipped changes.
    "clip-4": ("clip norm 4, learning rate 0.5, DP", "default.toml", ("clip-norm=4.0", "learning-rate=0.5")),
    "clip-0.25": ("clip norm 0.25, learning rate 8, DP", "default.toml", ("clip-norm=0.25", "learning-rate=8.0")),
    "qfedavg-no-dp": ("q-FedAvg q = 0.1, no DP", "no-dp.toml", ("strategy=qfedavg",)),
}


def run_one(row: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    _, config, settings = ROWS[row]
    result = run_simulation(config, runs_dir / f"{row}-{seed}", (*FEDERATION, *settings, f"seed={seed}"))
    fairness = json.loads((Path(result["run_dir"]) / "fairness.json").read_text())
    across = fairness["across_sites"]
    figures = {
        "row": row,
        "seed": seed,
        "test_accuracy": result["final_accuracy"],
        "mean_site_accuracy": round(across["mean"], 4),
        "worst_site": across["worst_site"],
        "worst_site_accuracy": round(across["worst"], 4),
        "spread": round(across["spread"], 4),
        "std": round(across["std"], 4),
        "seconds": result["wall_seconds"],
    }
    print(json.dumps(figures), file=sys.stderr, flush=True)  # progress, and the rows so far if it is stopped
    return figures


def run(
    runs_dir: Path, rows: tuple[str, ...] = tuple(ROWS), seeds: tuple[int, ...] = SEEDS, jobs: int = 2
) -> list[dict[str, Any]]:
    return list(in_parallel(run_one, [(row, seed, runs_dir) for row in rows for seed in seeds], jobs))


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        f"Seeds {seeds_of(results)}; each cell the mean over them (min-max).",
        "",
        "| run | test accuracy | mean site accuracy | worst site | spread | std across sites | s a run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, runs in by_row(results).items():
        cells = [
            mean_and_range([r[key] for r in runs])
            for key in ("test_accuracy", "mean_site_accuracy", "worst_site_accuracy", "spread", "std")
        ]
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of: {', '.join(ROWS)}")
    add_seeds_option(parser)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    options = parser.parse_args()
    rows = tuple(options.rows.split(","))
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    run_table("fairness", lambda runs_dir: run(runs_dir, rows, options.seeds, options.jobs), markdown)


if __name__ == "__main__":
    main()
