"""Does the empirical audit catch a DP bug at a given claimed epsilon and canary budget?

Each row is the default federation (5 sites, digits) run in one process
(simulations.in_process: the real ServerApp, ClientApps, Opacus and ledgers) with the bug
of simulations.injected_bug: every site adds a share of the noise it planned and
recorded. Then `cohort audit empirical`'s own audit of the run, with default guesses.
Prints a markdown table for docs/benchmarks.md.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.audit_bug_detection
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from flwr.supercore.task_identity import TaskIdentity

from audit.empirical import audit_run
from benchmarks.results import run_table
from simulations.in_process import run_in_process
from simulations.injected_bug import noise_cut_to

SITES = 5
ROUNDS = 20
NOISE_SHARE = 0.05
# (claimed epsilon, canaries)
CASES = [(1.0, 150), (2.0, 150), (4.0, 150), (4.0, 1000)]


def detect(epsilon: float, canaries: int, runs_dir: Path) -> dict[str, Any]:
    run_dir = runs_dir / f"epsilon-{epsilon:g}-m-{canaries}"
    settings = {
        "site-epsilon": epsilon,
        "rounds": ROUNDS,
        "audit-canaries": canaries,
        "noise-source": "seeded",
    }
    started = time.perf_counter()
    with noise_cut_to(NOISE_SHARE):
        run_in_process(settings, SITES, run_dir)
    run_seconds = time.perf_counter() - started
    result = audit_run(run_dir)
    row = {
        "claimed_epsilon": epsilon,
        "accountant_epsilon": round(result.accountant_epsilon or 0.0, 3),
        "canaries": canaries,
        "guesses": result.guesses,
        "correct": result.correct,
        "epsilon_lower_bound": round(result.epsilon_lower_bound, 3),
        "ceiling": round(result.ceiling, 3),
        "caught": result.contradicts_accountant,
        "run_seconds": round(run_seconds, 1),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress, and the rows so far if it is stopped
    return row


def run(runs_dir: Path) -> list[dict[str, Any]]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1  # as Flower's ClientApp runtime
    return [detect(epsilon, canaries, runs_dir) for epsilon, canaries in CASES]


def markdown(rows: list[dict[str, Any]]) -> str:
    header = [
        "| claimed epsilon | accountant's epsilon | m | r | right | bound (95%) | ceiling | PRIVACY BUG | run s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(header + [_line(row) for row in rows])


def _line(row: dict[str, Any]) -> str:
    return (
        f"| {row['claimed_epsilon']:g} | {row['accountant_epsilon']:.3f} | {row['canaries']} | {row['guesses']} | "
        f"{row['correct']} | {row['epsilon_lower_bound']:.3f} | {row['ceiling']:.2f} | "
        f"{'yes' if row['caught'] else 'no'} | {row['run_seconds']:.0f} |"
    )


if __name__ == "__main__":
    run_table("audit-bug-detection", run, markdown)
