"""What one change does to accuracy under DP: a shipped configuration as it is, then with
each row's settings changed, every row over several seeds (issue 22's ablation).

Each run is Cohort's own federation in one process (simulations/in_process.py: the
ServerApp and ClientApp, the sites' partitions, privacy planning, seeded DP-SGD noise and
ledgers, the server's checks and strategy), without Flower's transport, which carries the
same messages and does not change what a run learns; so a row costs its training, not a
Ray start, and `--jobs` runs several at once. The non-private twin (`dp=false`) is always a
row, as the goal is a gap to it. `benchmarks/dp_accuracy.py` then confirms a chosen
default with the real `cohort simulate`.

    .venv/bin/python -m benchmarks.dp_ablation --config default.toml \\
        --row local-epochs=2 --row "rounds=100 learning-rate=1.0" --seeds 42,43,44 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.results import RESULTS, add_seeds_option, by_row, mean_and_range, seeds_of
from common.config import SEEDED_NOISE
from common.errors import CohortInputError
from server.rundir import RunDirectory
from simulations.in_process import run_in_process
from simulations.plan import SIMULATION_SETTINGS, SIMULATIONS_DIR, load_plan, parse_overrides

AS_SHIPPED = ""
NON_PRIVATE = "dp=false site-allow-non-private=true"


def federation(config: str, row: str) -> tuple[dict[str, Any], int]:
    """The run settings of `config` with the row's changes, and its number of sites; checked
    as `cohort simulate` checks them, and with the noise seeded as it seeds it."""
    overrides = row.split()
    plan = load_plan(SIMULATIONS_DIR / config, overrides)
    values = {**tomllib.loads((SIMULATIONS_DIR / config).read_text()), **parse_overrides(overrides)}
    settings = {key: value for key, value in values.items() if key not in SIMULATION_SETTINGS}
    return {"noise-source": SEEDED_NOISE, **settings}, plan.num_sites


def run_once(config: str, row: str, seed: int) -> dict[str, Any]:
    """One run in this process, one CPU thread as Ray gives a simulated site."""
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # a line per round and site would bury the results
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # so would Opacus' note on seeded noise
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1  # as Flower's ClientApp runtime
    settings, sites = federation(config, row)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cohort-ablation-") as run_dir:
        grid = run_in_process({**settings, "seed": seed}, sites, Path(run_dir))
        summary = RunDirectory(Path(run_dir)).read_summary()
    if grid.stopped or summary is None or summary.final_accuracy is None:
        raise RuntimeError(f"{config} [{row}] seed {seed} did not complete: {grid.stopped or 'no summary'}")
    result = {
        "config": config,
        "row": row,
        "seed": seed,
        "accuracy": round(summary.final_accuracy, 4),
        "max_epsilon": None if summary.max_epsilon is None else round(summary.max_epsilon, 3),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    """A row per change: accuracy as mean (min-max) over the seeds, and its gap to no DP."""
    plain = [r["accuracy"] for r in results if r["row"] == NON_PRIVATE]
    baseline = statistics.mean(plain) if plain else None
    lines = [
        f"`{results[0]['config']}`, seeds {seeds_of(results)}",
        "",
        "| change | held-out accuracy: mean (min-max) | against no DP | largest site epsilon | s a run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row, runs in by_row(results).items():
        values = [r["accuracy"] for r in runs]
        mean = statistics.mean(values)
        gap = "" if baseline is None or row == NON_PRIVATE else f"{mean - baseline:+.3f}"
        epsilons = [r["max_epsilon"] for r in runs if r["max_epsilon"] is not None]
        epsilon = f"{max(epsilons):.3f}" if epsilons else "-"
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {row or 'as shipped'} | {mean_and_range(values)} | {gap} | {epsilon} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default.toml", help="a simulation file in simulations/")
    parser.add_argument("--row", action="append", default=[], help="settings changed together: 'key=value ...'")
    add_seeds_option(parser)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--no-baselines", action="store_true", help="only the rows given, not as shipped and no DP")
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_ablation.json")
    options = parser.parse_args()
    rows = options.row if options.no_baselines else [AS_SHIPPED, NON_PRIVATE, *options.row]
    for row in rows:  # a bad row stops the table before any run
        try:
            federation(options.config, row)
        except CohortInputError as error:
            parser.error(f"row {row!r}: {error}")
    planned = [(options.config, row, seed) for row in rows for seed in options.seeds]
    with ProcessPoolExecutor(max_workers=options.jobs) as pool:
        results = list(pool.map(run_once, *zip(*planned, strict=True)))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
