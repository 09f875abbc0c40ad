"""The one-shot estimate of client-level epsilon (audit.one_shot) against the server's
accountant, on correct runs and on runs whose server adds a share of its recorded noise.

Each row is simulations/client-level.toml's federation (adaptive clipping at the server,
digits, cnn) with fewer devices, run in one process (simulations.in_process: the real
ServerApp, ClientApps and ledgers) with `audit-canary-clients` canary clients, then
`cohort audit empirical`'s estimate of the run. A buggy row runs with the bug of
simulations.injected_bug: the coordinator adds NOISE_SHARE of the noise its ledger
records. Prints a markdown table for docs/benchmarks.md.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.one_shot_estimate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from flwr.supercore.task_identity import TaskIdentity

from audit.one_shot import estimate_run
from benchmarks.results import run_table
from simulations.in_process import run_in_process
from simulations.injected_bug import noise_cut_to
from simulations.plan import SIMULATIONS_DIR

NOISE_SHARE = 0.05
EPSILONS = (1.0, 2.0, 4.0, 8.0)
SEEDS = (42, 7, 1)


def estimate(epsilon: float, seed: int, buggy: bool, options: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    run_dir = runs_dir / f"epsilon-{epsilon:g}-seed-{seed}{'-buggy' if buggy else ''}"
    config = tomllib.loads((SIMULATIONS_DIR / "client-level.toml").read_text(encoding="utf-8"))
    config.pop("num-sites")
    settings = {
        **config,
        "client-epsilon": epsilon,
        "rounds": options.rounds,
        "seed": seed,
        "audit-canary-clients": options.canaries,
        "noise-source": "seeded",
    }
    started = time.perf_counter()
    if buggy:
        with noise_cut_to(NOISE_SHARE):
            run_in_process(settings, options.sites, run_dir)
    else:
        run_in_process(settings, options.sites, run_dir)
    run_seconds = time.perf_counter() - started
    result = estimate_run(run_dir)
    row = {
        "claimed_epsilon": epsilon,
        "seed": seed,
        "noise": f"{NOISE_SHARE:.0%} (bug)" if buggy else "as recorded",
        "accountant_epsilon": round(result.accountant_epsilon or 0.0, 3),
        "epsilon_final": round(result.epsilon_final, 3),
        "epsilon_all_iterates": round(result.epsilon_all_iterates, 3),
        "epsilon_low_end": round(result.epsilon_low_end, 3),
        "above_accountant": result.above_accountant,
        "canaries": result.inserted,
        "unclipped": result.unclipped,
        "run_seconds": round(run_seconds, 1),
        "estimate_seconds": result.seconds,
    }
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress, and the rows so far if it is stopped
    return row


def run(runs_dir: Path, options: argparse.Namespace) -> list[dict[str, Any]]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1  # as Flower's ClientApp runtime
    rows = [estimate(epsilon, seed, False, options, runs_dir) for epsilon in options.epsilons for seed in options.seeds]
    return rows + [estimate(epsilon, options.seeds[0], True, options, runs_dir) for epsilon in options.epsilons]


def markdown(rows: list[dict[str, Any]]) -> str:
    header = [
        (
            "| claimed epsilon | seed | noise added | accountant's epsilon | estimate: final model | all iterates | "
            "low end | above the accountant | run s | estimate s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(header + [_line(row) for row in rows])


def _line(row: dict[str, Any]) -> str:
    return (
        f"| {row['claimed_epsilon']:g} | {row['seed']} | {row['noise']} | {row['accountant_epsilon']:.3f} | "
        f"{row['epsilon_final']:.3f} | {row['epsilon_all_iterates']:.3f} | {row['epsilon_low_end']:.3f} | "
        f"{'yes' if row['above_accountant'] else 'no'} | {row['run_seconds']:.0f} | {row['estimate_seconds']:.1f} |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--sites", type=int, default=20, help="real devices (client-level.toml has 100)")
    parser.add_argument("--canaries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    arguments = parser.parse_args()
    run_table("one-shot-estimate", lambda runs_dir: run(runs_dir, arguments), markdown)
