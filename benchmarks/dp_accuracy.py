"""What DP costs on the shipped configurations: held-out accuracy under DP (epsilon <= 8 at
every site) against the same configuration without DP, over several seeds.

Every figure is a real `cohort simulate`: each configuration as shipped, and its
non-private twin (`--set dp=false --set site-allow-non-private=true`: the batch size and
learning rate then follow the non-private defaults), once per seed (`--set seed=S`, which
draws the split, the partition, the initial model and, as `cohort simulate` seeds its noise,
the DP noise: a seed gives the same figures every time). Prints the table
docs/benchmarks.md quotes, with each configuration's goal (issue 22). Not part of `make
benchmark`: the full table is 18 simulations, six of them on mnist-5k.

    .venv/bin/python -m benchmarks.dp_accuracy                       # writes results/dp_accuracy.json
    .venv/bin/python -m benchmarks.dp_accuracy --seeds 42 --configs default.toml
    .venv/bin/python -m benchmarks.dp_accuracy --jobs 3             # three simulations at a time
    .venv/bin/python -m benchmarks.dp_accuracy --cohort /other/checkout/.venv/bin/cohort \\
        --configs /other/checkout/simulations/default.toml           # another checkout, its own files
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.results import SEEDS, add_seeds_option, in_parallel, mean_and_range, run_table, seeds_of
from benchmarks.simulations import COHORT, run_simulation

NON_PRIVATE = ("dp=false", "site-allow-non-private=true")
# configuration -> (goal, what it says): within this much of the non-private twin's mean,
# or at least this accuracy.
GOALS: dict[str, tuple[str, float]] = {
    "default.toml": ("gap", 0.02),
    "transformer.toml": ("gap", 0.02),
    "mnist-non-iid.toml": ("at least", 0.95),
}


def run(
    runs_dir: Path,
    configs: tuple[str, ...] = tuple(GOALS),
    seeds: tuple[int, ...] = SEEDS,
    cohort: str = COHORT,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Every configuration under DP and without, once per seed, `jobs` simulations at a time."""
    planned = [
        (config, privacy, settings, seed)
        for config in configs
        for privacy, settings in (("dp", ()), ("no-dp", NON_PRIVATE))
        for seed in seeds
    ]

    def one(config: str, privacy: str, settings: tuple[str, ...], seed: int) -> dict[str, Any]:
        result = run_simulation(
            config, runs_dir / f"{Path(config).stem}-{privacy}-{seed}", (*settings, f"seed={seed}"), cohort
        )
        print(
            f"{config} {privacy} seed {seed}: {result['final_accuracy']:.4f} ({result['wall_seconds']:.0f} s)",
            flush=True,
        )
        return {**result, "config": Path(config).name, "privacy": privacy, "seed": seed}

    return list(in_parallel(one, planned, jobs))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| configuration | seeds | under DP: mean (min-max) | largest site epsilon | without DP: mean (min-max) | "
            "DP - no DP | goal | met |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config in dict.fromkeys(r["config"] for r in rows):
        private = [r for r in rows if r["config"] == config and r["privacy"] == "dp"]
        plain = [r for r in rows if r["config"] == config and r["privacy"] == "no-dp"]
        dp_mean, plain_mean = _mean(private), _mean(plain)
        goal, met = _goal(config, dp_mean, plain_mean)
        epsilon = max((r["max_epsilon"] for r in private if r["max_epsilon"] is not None), default=None)
        gap = "-" if dp_mean is None or plain_mean is None else f"{dp_mean - plain_mean:+.3f}"
        seeds = seeds_of(private + plain)
        lines.append(
            f"| `{config}` | {seeds} | {_cell(private)} | {'-' if epsilon is None else f'{epsilon:.3f}'} | "
            f"{_cell(plain)} | {gap} | {goal} | {met} |"
        )
    return "\n".join(lines)


def _goal(config: str, dp_mean: float | None, plain_mean: float | None) -> tuple[str, str]:
    """The configuration's goal in words, and whether the rows meet it ('-': no goal)."""
    if config not in GOALS:
        return "-", "-"
    kind, bound = GOALS[config]
    if kind == "gap":
        met = dp_mean is not None and plain_mean is not None and plain_mean - dp_mean <= bound
        return f"within {bound:g} of no DP", "yes" if met else "no"
    return f">= {bound:g}", "yes" if dp_mean is not None and dp_mean >= bound else "no"


def _mean(rows: list[dict[str, Any]]) -> float | None:
    return statistics.mean(r["final_accuracy"] for r in rows) if rows else None


def _cell(rows: list[dict[str, Any]]) -> str:
    return mean_and_range([r["final_accuracy"] for r in rows]) if rows else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(GOALS), help="simulation files: names in simulations/, or paths")
    add_seeds_option(parser)
    parser.add_argument("--cohort", default=COHORT, help="the cohort command to run (another checkout's, to compare)")
    parser.add_argument("--jobs", type=int, default=1, help="simulations at a time")
    args = parser.parse_args()
    configs = tuple(args.configs.split(","))
    run_table("dp_accuracy", lambda runs: run(runs, configs, args.seeds, args.cohort, args.jobs), markdown)


if __name__ == "__main__":
    main()
