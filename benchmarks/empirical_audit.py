"""The one-run empirical audit against the accountant: no DP, and DP at epsilon 1, 4, 8.

Each row is a real `cohort simulate` of the default federation with canaries at site-0,
then `cohort audit empirical` on its final model. Prints a markdown table for
docs/benchmarks.md.

    .venv/bin/python -m benchmarks.empirical_audit
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
CANARIES = 150
ROUNDS = 20
SETTINGS = {
    "no DP": ["simulations/no-dp.toml"],
    "epsilon 1": ["--set", "site-epsilon=1.0"],
    "epsilon 4": ["--set", "site-epsilon=4.0"],
    "epsilon 8": ["--set", "site-epsilon=8.0"],
}


def audit_one(label: str, settings: list[str], runs_dir: Path) -> dict[str, Any]:
    runs = runs_dir / label.replace(" ", "-")
    started = time.perf_counter()
    command = [
        COHORT,
        "simulate",
        *settings,
        "--set",
        f"rounds={ROUNDS}",
        "--set",
        f"audit-canaries={CANARIES}",
        "--runs-dir",
        str(runs),
    ]
    subprocess.run(command, check=True, capture_output=True)
    run_seconds = time.perf_counter() - started
    (run_dir,) = list(runs.iterdir())
    started = time.perf_counter()
    subprocess.run([COHORT, "audit", "empirical", str(run_dir)], check=True, capture_output=True)
    audit_seconds = time.perf_counter() - started
    saved = json.loads((run_dir / "empirical_audit.json").read_text())
    summary = RunDirectory(run_dir).read_summary()
    assert summary is not None and summary.final_accuracy is not None
    return {
        "setting": label,
        "accuracy": round(summary.final_accuracy, 4),
        "accountant_epsilon": None if saved["accountant_epsilon"] is None else round(saved["accountant_epsilon"], 3),
        "epsilon_lower_bound": round(saved["epsilon_lower_bound"], 3),
        "canaries": saved["canaries"],
        "guesses": saved["guesses"],
        "correct": saved["correct"],
        "run_seconds": round(run_seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
    }


def run(runs_dir: Path) -> list[dict[str, Any]]:
    return [audit_one(label, settings, runs_dir) for label, settings in SETTINGS.items()]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| setting | accuracy | accountant's epsilon (site-0) | "
            "audited lower bound (95%) | m | r | right | run s | audit s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        claimed = "none (no DP)" if row["accountant_epsilon"] is None else f"{row['accountant_epsilon']:.3f}"
        lines.append(
            f"| {row['setting']} | {row['accuracy']:.3f} | {claimed} | {row['epsilon_lower_bound']:.3f} | "
            f"{row['canaries']} | {row['guesses']} | {row['correct']} | {row['run_seconds']:.0f} | "
            f"{row['audit_seconds']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_table("empirical-audit", run, markdown)
