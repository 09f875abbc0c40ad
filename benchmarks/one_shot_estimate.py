"""The one-shot estimate of client-level epsilon (audit.one_shot) against the server's
accountant, on correct runs and on runs whose server adds a share of its recorded noise.

Each row is simulations/client-level.toml's federation (adaptive clipping at the server,
digits, cnn) with fewer devices, run in one process (simulations.in_process: the real
ServerApp, ClientApps and ledgers) with `audit-canary-clients` canary clients, then
`cohort audit empirical`'s estimate of the run. A buggy row runs with the bug of
simulations.injected_bug: the coordinator adds NOISE_SHARE of the noise its ledger
records. Prints a markdown table for docs/benchmarks.md.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.one_shot_estimate

With --fit-only, the estimator alone, on cosines drawn from the paper's own Gaussian model
of one client-level release (what tests/test_client_level_dp.py's run releases): how far
the fitted figure and the low end move with the number of canaries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

from audit.one_shot import estimate_run, final_model_epsilon, fit, low_end_epsilon
from audit.two_gaussians import Gaussian, epsilon_between
from benchmarks.results import run_table
from common.privacy.accounting import PrivacyState
from simulations.in_process import run_in_process
from simulations.injected_bug import noise_cut_to
from simulations.plan import SIMULATIONS_DIR

NOISE_SHARE = 0.05
EPSILONS = (1.0, 2.0, 4.0, 8.0)
SEEDS = (42, 7, 1)
# --fit-only: one release at an accounted sigma of 1 under adaptive clipping, whose update
# noise is then 1 / sqrt(1 - 1/4) (the count's noise at twice sigma), in the cnn's dimension.
FIT_SIGMA = 1.0
FIT_UPDATE_SIGMA = (1 - 0.25) ** -0.5
FIT_DIMENSION = 6186
FIT_DELTA = 1e-5
FIT_CANARIES = (20, 50, 100, 200, 500, 1000)
FIT_DRAWS = 200


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
        "accountant_epsilon": round(result.accountant_epsilon, 3),
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


def fit_only(canary_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """Cosines of K inserted canaries drawn as N(mu / sqrt(d), 1 / d), mu = 1 / update sigma
    (the paper's model of a canary in one Gaussian release), then both figures, FIT_DRAWS times."""
    rng = np.random.default_rng(0)
    shift = FIT_UPDATE_SIGMA**-1
    accountant = PrivacyState(FIT_SIGMA, 1.0, "rdp", ((FIT_SIGMA, 1.0, 1),)).epsilon(FIT_DELTA)
    true = epsilon_between(Gaussian(0.0, 1.0), Gaussian(shift, 1.0), FIT_DELTA)
    rows = []
    for k in canary_counts:
        fitted = [fit(rng.normal(shift, 1.0, k) / FIT_DIMENSION**0.5) for _ in range(FIT_DRAWS)]
        paper = np.array([final_model_epsilon(f, FIT_DIMENSION, FIT_DELTA) for f in fitted])
        low = np.array([low_end_epsilon(f, k, FIT_DIMENSION, FIT_DELTA) for f in fitted])
        rows.append(
            {
                "canaries": k,
                "true_epsilon": round(true, 3),
                "accountant_epsilon": round(accountant, 3),
                "paper_median": round(float(np.median(paper)), 3),
                "paper_p95": round(float(np.percentile(paper, 95)), 3),
                "paper_above_accountant": float(np.mean(paper > accountant)),
                "low_end_median": round(float(np.median(low)), 3),
                "low_end_p95": round(float(np.percentile(low, 95)), 3),
                "low_end_above_accountant": float(np.mean(low > accountant)),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def fit_markdown(rows: list[dict[str, Any]]) -> str:
    header = [
        (
            "| K | true epsilon | accountant's | paper's estimate: median | 95th percentile | above the accountant | "
            "low end: median | 95th percentile | above the accountant |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines = [
        f"| {r['canaries']} | {r['true_epsilon']:.2f} | {r['accountant_epsilon']:.2f} | {r['paper_median']:.2f} | "
        f"{r['paper_p95']:.2f} | {r['paper_above_accountant']:.0%} | {r['low_end_median']:.2f} | "
        f"{r['low_end_p95']:.2f} | {r['low_end_above_accountant']:.0%} |"
        for r in rows
    ]
    return "\n".join(header + lines)


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
    parser.add_argument("--fit-only", action="store_true", help="the estimator alone, on the paper's model")
    arguments = parser.parse_args()
    if arguments.fit_only:
        run_table("one-shot-fit", lambda _: fit_only(FIT_CANARIES), fit_markdown)
    else:
        run_table("one-shot-estimate", lambda runs_dir: run(runs_dir, arguments), markdown)
