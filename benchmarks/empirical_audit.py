"""Calibration of the one-run empirical audit: no DP, and DP at epsilon 1, 2, 4 and 8, with
each canary kind scored on the per-round transcript, over seeds.

Each row is a real `cohort simulate` of the default federation (5 sites, digits) with
canaries at site-0, then `cohort audit empirical` with its default guesses. Prints a
markdown table for docs/benchmarks.md: per setting and canary kind, the bound of every
seed against the accountant's epsilon and the test's ceiling for that m and r, and what
the audit cost (its seconds, the transcript's size on disk).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.empirical_audit [--seeds 42 7] [--kinds dirac input]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.results import run_table
from client.policy import POLICY_FILE
from server.audit_transcript import TRANSCRIPT_DIR

COHORT = str(Path(sys.executable).parent / "cohort")
CANARIES = 150
ROUNDS = 20
SETTINGS = {
    "no DP": ["--set", "dp=false", "--set", "site-allow-non-private=true"],
    "epsilon 1": ["--set", "site-epsilon=1.0"],
    "epsilon 2": ["--set", "site-epsilon=2.0"],
    "epsilon 4": ["--set", "site-epsilon=4.0"],
    "epsilon 8": ["--set", "site-epsilon=8.0"],
}
SEEDS = [42, 7, 1, 2, 3]
KINDS = ["dirac", "input"]
# At epsilon 1 over 20 rounds the sites' plans need sigma 13 to 18, above a site's default
# bound of 8 (a guard against training on noise, client/policy.py); each site's policy in
# the run's own federation home raises it, so that every setting trains.
MAX_NOISE_MULTIPLIER = 25.0
SITES = 5


def audit_one(label: str, kind: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    runs = runs_dir / f"{label.replace(' ', '-')}-{kind}-{seed}"
    home = runs / "federation-home"
    for site in range(SITES):
        (home / f"site-{site}").mkdir(parents=True)
        (home / f"site-{site}" / POLICY_FILE).write_text(f"max-noise-multiplier = {MAX_NOISE_MULTIPLIER}\n")
    started = time.perf_counter()
    command = [COHORT, "simulate", *SETTINGS[label]]
    for setting in (
        f"num-sites={SITES}",
        f"rounds={ROUNDS}",
        f"audit-canaries={CANARIES}",
        f"audit-canary-kind={kind}",
        f"seed={seed}",
    ):
        command += ["--set", setting]
    command += ["--federation-home", str(home)]
    simulated = subprocess.run([*command, "--runs-dir", str(runs)], check=False, capture_output=True, text=True)
    if simulated.returncode != 0:
        raise RuntimeError(f"{label}, {kind}, seed {seed}: cohort simulate failed: {simulated.stderr[-2000:]}")
    run_seconds = time.perf_counter() - started
    (run_dir,) = [path for path in runs.iterdir() if path != home]
    started = time.perf_counter()
    audited = subprocess.run([COHORT, "audit", "empirical", str(run_dir)], check=False, capture_output=True, text=True)
    audit_seconds = time.perf_counter() - started
    saved = json.loads((run_dir / "empirical_audit.json").read_text())
    transcript = sum(file.stat().st_size for file in (run_dir / TRANSCRIPT_DIR).iterdir())
    row = {
        "setting": label,
        "kind": kind,
        "seed": seed,
        "exit": audited.returncode,
        "accountant_epsilon": None if saved["accountant_epsilon"] is None else round(saved["accountant_epsilon"], 3),
        "epsilon_lower_bound": round(saved["epsilon_lower_bound"], 3),
        "ceiling": round(saved["ceiling"], 3),
        "canaries": saved["canaries"],
        "guesses": saved["guesses"],
        "correct": saved["correct"],
        "run_seconds": round(run_seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
        "transcript_mb": round(transcript / 1e6, 2),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress, and the rows so far if it is stopped
    return row


def run(runs_dir: Path, seeds: list[int] = SEEDS, kinds: list[str] = KINDS) -> list[dict[str, Any]]:
    return [audit_one(label, kind, seed, runs_dir) for kind in kinds for label in SETTINGS for seed in seeds]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| setting | canaries | accountant's epsilon (site-0) | lower bound per seed (95%) | right of r | "
            "ceiling (m, r) | run s | audit s | transcript MB |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["kind"]), []).append(row)
    for (setting, kind), group in groups.items():
        claimed = [row["accountant_epsilon"] for row in group]
        claim = "none (no DP)" if claimed[0] is None else _each(claimed, "{:.3f}")
        first = group[0]
        lines.append(
            f"| {setting} | {kind} | {claim} | {_each([r['epsilon_lower_bound'] for r in group], '{:.3f}')} | "
            f"{_each([r['correct'] for r in group], '{}')} of {first['guesses']} | "
            f"{first['ceiling']:.2f} ({first['canaries']}, {first['guesses']}) | "
            f"{_each([r['run_seconds'] for r in group], '{:.0f}')} | "
            f"{_each([r['audit_seconds'] for r in group], '{:.1f}')} | {first['transcript_mb']:.2f} |"
        )
    return "\n".join(lines)


def _each(values: list[Any], form: str) -> str:
    """One figure per seed, in seed order."""
    return " / ".join(form.format(value) for value in values)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--kinds", nargs="+", default=KINDS)
    options = parser.parse_args()
    run_table("empirical-audit", lambda runs_dir: run(runs_dir, options.seeds, options.kinds), markdown)
