"""FedAvg against q-FedAvg, with and without DP: mean and worst-site accuracy.

10 simulated sites on digits with Dirichlet alpha 0.3 (strong label skew), each a real
`cohort simulate`; the per-site figures are the fairness report's (the final global
model on each site's own validation split). Prints a markdown table for
docs/benchmarks.md.

    .venv/bin/python -m benchmarks.fairness
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.results import run_table
from server.rundir import RunDirectory

COHORT = str(Path(sys.executable).parent / "cohort")
ROUNDS = 20
FEDERATION = ["--set", "num-sites=10", "--set", "dirichlet-alpha=0.3", "--set", f"rounds={ROUNDS}"]
RUNS = {
    ("fedavg", "DP, epsilon 8"): [],
    ("qfedavg", "DP, epsilon 8"): ["--set", "strategy=qfedavg"],
    ("fedavg", "no DP"): ["simulations/no-dp.toml"],
    ("qfedavg", "no DP"): ["simulations/no-dp.toml", "--set", "strategy=qfedavg"],
}


def run_one(strategy: str, privacy: str, settings: list[str], runs_dir: Path) -> dict[str, Any]:
    runs = runs_dir / f"{strategy}-{privacy.replace(' ', '').replace(',', '-')}"
    started = time.perf_counter()
    subprocess.run(
        [COHORT, "simulate", *settings, *FEDERATION, "--runs-dir", str(runs)], check=True, capture_output=True
    )
    seconds = time.perf_counter() - started
    (run_dir,) = list(runs.iterdir())
    fairness = json.loads((run_dir / "fairness.json").read_text())
    summary = RunDirectory(run_dir).read_summary()
    assert summary is not None and summary.final_accuracy is not None
    across = fairness["across_sites"]
    return {
        "strategy": strategy,
        "privacy": privacy,
        "test_accuracy": round(summary.final_accuracy, 4),
        "mean_site_accuracy": round(across["mean"], 4),
        "worst_site": across["worst_site"],
        "worst_site_accuracy": round(across["worst"], 4),
        "spread": round(across["spread"], 4),
        "seconds": round(seconds, 1),
    }


def run(runs_dir: Path) -> list[dict[str, Any]]:
    return [run_one(strategy, privacy, settings, runs_dir) for (strategy, privacy), settings in RUNS.items()]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | privacy | test accuracy | mean site accuracy | worst site | spread | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['strategy']} | {r['privacy']} | {r['test_accuracy']:.3f} | {r['mean_site_accuracy']:.3f} | "
        f"{r['worst_site']} {r['worst_site_accuracy']:.3f} | {r['spread']:.3f} | {r['seconds']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    run_table("fairness", run, markdown)
