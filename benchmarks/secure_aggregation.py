"""What secure aggregation costs, and what distributed DP gives up against central DP.

Two tables for docs/benchmarks.md:

- cost: per-round time and bytes per site, with and without secure aggregation, at 10 and
  100 simulated sites (digits, IID, sample-level DP-SGD: the default mode, so that only
  how updates travel differs). Time: real simulations through `simulations.runner` (a
  private SuperLink, Flower's simulation engine), the mean of the rounds after the first
  (the first also starts Ray's workers). Bytes: one round of the same federation in one
  process (simulations/in_process.py), the serialized size of every message's content a
  site sent (up) and was sent (down) over the round, training and validation included;
  Flower's own framing is left out.
- accuracy: simulations/secure-aggregation.toml (100 devices, client-level DP at epsilon 8)
  with distributed DP (secure aggregation, Skellam noise from the sites; with the default
  secure-aggregation-dropout of 0.2, and with 0), against the same run with central DP
  (the coordinator's Gaussian noise, Flower's fixed-clipping wrapper, the sites clipping):
  the held-out accuracy after the last round, for each seed.

    .venv/bin/python -m benchmarks.secure_aggregation [cost] [accuracy]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from flwr.supercore.task_identity import TaskIdentity

from benchmarks.results import run_table
from benchmarks.scale import simulate
from server.rundir import RunDirectory
from simulations.in_process import run_in_process
from simulations.plan import SIMULATIONS_DIR, load_plan, plan_from_values

ROUNDS = 3
SEEDS = (42, 7)
COST_SETTINGS = {
    "dataset": "digits",
    "partitioner": "iid",
    "dp": True,
    "rounds": ROUNDS,
    "run-name": "secure-aggregation-cost",
}
# secure-aggregation.toml already has the sites clip at a fixed norm, so central DP differs
# only in who adds the noise.
ACCURACY_VARIANTS = {
    "central (the server's Gaussian noise)": ["secure-aggregation=false"],
    "distributed (Skellam from the sites), dropout 0.2": [],
    "distributed (Skellam from the sites), dropout 0": ["secure-aggregation-dropout=0.0"],
}


def bytes_per_site(sites: int, secure: bool) -> tuple[float, float]:
    """Mean bytes a site sends and is sent over one round, in one process."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    with tempfile.TemporaryDirectory() as run_dir:
        grid = run_in_process({**COST_SETTINGS, "rounds": 1, "secure-aggregation": secure}, sites, Path(run_dir))
    up, down = grid.bytes_by_node()
    return statistics.mean(up.values()), statistics.mean(down.values())


def cost(runs_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for sites in (10, 100):
        for secure in (False, True):
            plan = plan_from_values({**COST_SETTINGS, "num-sites": sites, "secure-aggregation": secure})
            timing = simulate(plan, runs_dir / f"{sites}-{'secure' if secure else 'plain'}", None)
            up, down = bytes_per_site(sites, secure)
            rows.append(
                {
                    "sites": sites,
                    "secure_aggregation": secure,
                    "seconds_per_round": round(timing["seconds_per_round"], 2),
                    "bytes_up": round(up),
                    "bytes_down": round(down),
                }
            )
    return rows


def accuracy(runs_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, overrides in ACCURACY_VARIANTS.items():
        for seed in SEEDS:
            plan = load_plan(SIMULATIONS_DIR / "secure-aggregation.toml", [*overrides, f"seed={seed}"])
            runs = runs_dir / f"run-{len(rows)}"
            timing = simulate(plan, runs, None)
            (run_dir,) = list(runs.iterdir())
            summary = RunDirectory(run_dir).read_summary()
            assert (
                summary is not None and summary.final_accuracy is not None and summary.client_level_epsilon is not None
            )
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "accuracy": summary.final_accuracy,
                    "client_epsilon": summary.client_level_epsilon,
                    **timing,
                }
            )
    return rows


def cost_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| sites | secure aggregation | s per round | kB sent per site per round | kB received per site per round |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines.extend(
        f"| {r['sites']} | {'yes' if r['secure_aggregation'] else 'no'} | {r['seconds_per_round']:.2f}"
        f" | {r['bytes_up'] / 1000:.1f} | {r['bytes_down'] / 1000:.1f} |"
        for r in rows
    )
    return "\n".join(lines)


def accuracy_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| client-level DP at epsilon 8 | seed | held-out accuracy | client-level epsilon | s per round |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines.extend(
        f"| {r['variant']} | {r['seed']} | {r['accuracy']:.3f} | {r['client_epsilon']:.3f}"
        f" | {r['seconds_per_round']:.2f} |"
        for r in rows
    )
    return "\n".join(lines)


if __name__ == "__main__":
    tables = {"cost": (cost, cost_markdown), "accuracy": (accuracy, accuracy_markdown)}
    for table in sys.argv[1:] or list(tables):
        run_table(f"secure-aggregation-{table}", *tables[table])
