"""Robust aggregation against real attacks: one table for docs/benchmarks.md.

10 simulated sites on digits, 2 of them hostile (attack-sites = 0.2, sites 8 and 9), each
attack against FedAvg (with the server's reply checks) and each robust strategy, with and
without DP, beside the clean run. For the backdoor, the attack success rate too: the share
of held-out test images of other classes that the final model puts in the target class
once the trigger is stamped on them.

    .venv/bin/python -m benchmarks.attacks                       # the full table
    .venv/bin/python -m benchmarks.attacks --rounds 5 --dp off --strategies fedavg,fedmedian
    .venv/bin/python -m benchmarks.attacks --dp on --seeds 42,43,44 --jobs 3

Each run is a real `cohort simulate`, once per seed (`--set seed=S`: the split, the
partition, the initial model and the DP noise); a cell of the table is the mean of its
seeds, with their range. With 2 cores a 50-round DP run of 10 sites takes 87 s alone, half
of it Ray starting with a core idle; three at a time (`--jobs 3`) finished one about every
53 s. Results are written after every run, so a stopped table keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.results import RESULTS, add_seeds_option, in_parallel, mean_and_range, seeds_of
from benchmarks.simulations import COHORT
from common.evaluation import resolve_device
from common.models.registry import build_model
from server.held_out import federated_split
from server.rundir import RunDirectory
from simulations.attack_spec import ATTACKS
from simulations.data_poisoning import BACKDOOR_TARGET, stamp_trigger
from simulations.plan import SIMULATIONS_DIR, load_plan

SITES, HOSTILE = 10, 2
# Strategy settings for 10 sites of which 2 are hostile. Bulyan needs 4f+3 sites, so with
# 10 it can only be told to expect f = 1.
STRATEGIES: dict[str, list[str]] = {
    "fedavg": [],
    "fedmedian": [],
    "fedtrimmedavg": ["trimmed-beta=0.2"],
    "krum": [f"byzantine-sites={HOSTILE}"],
    "multikrum": [f"byzantine-sites={HOSTILE}", f"krum-selected={SITES - HOSTILE}"],
    "bulyan": ["byzantine-sites=1"],
}
TABLE_ATTACKS = tuple(a for a in ATTACKS if a != "silent")
DP_SETTINGS = {"off": "no-dp.toml", "on": "default.toml"}


def run_cell(attack: str | None, strategy: str, dp: str, rounds: int, seed: int, runs_dir: Path) -> dict[str, Any]:
    """One real simulation; its final accuracy, rejections and backdoor success rate."""
    settings = [f"num-sites={SITES}", f"rounds={rounds}", f"seed={seed}", f"strategy={strategy}", *STRATEGIES[strategy]]
    if attack is not None:
        settings += [f'attack="{attack}"', f"attack-sites={HOSTILE / SITES}"]
    target = runs_dir / f"{dp}-{strategy}-{attack or 'clean'}-{seed}"
    command = [COHORT, "simulate", str(SIMULATIONS_DIR / DP_SETTINGS[dp]), "--runs-dir", str(target)]
    for setting in settings:
        command += ["--set", setting]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    run_dirs = list(target.glob("*")) if target.exists() else []
    summary = RunDirectory(run_dirs[0]).read_summary() if run_dirs else None
    if summary is None:
        return {
            "attack": attack or "clean",
            "strategy": strategy,
            "dp": dp,
            "seed": seed,
            "error": result.stderr.strip().splitlines()[-1:] or ["no run directory"],
        }
    metrics = RunDirectory(run_dirs[0]).read_metrics()
    cell = {
        "attack": attack or "clean",
        "strategy": strategy,
        "dp": dp,
        "seed": seed,
        "accuracy": None if summary.final_accuracy is None else round(summary.final_accuracy, 4),
        "rounds": summary.rounds,
        "rejected": {site: r.count for site, r in summary.rejected.items()},
        "failures": sum(len(m.failures) for m in metrics),
        "stop_reason": summary.stop_reason,
        "wall_seconds": round(wall, 1),
    }
    if attack == "backdoor":
        cell["backdoor_success"] = round(backdoor_success(run_dirs[0]), 4)
    return cell


def backdoor_success(run_dir: Path) -> float:
    """Share of triggered test images, of classes other than the target, classified as the target."""
    run = RunDirectory(run_dir).read_config()
    split = federated_split(run.data)
    model = build_model(run.training.model, split.input_shape, split.num_classes)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    others = split.test.labels != BACKDOOR_TARGET
    triggered = torch.from_numpy(stamp_trigger(split.test.images[others]))
    with torch.no_grad():
        predicted = model(triggered.to(resolve_device("cpu"))).argmax(dim=1).numpy()
    return float((predicted == BACKDOOR_TARGET).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=0, help="rounds per run (0: the config's own)")
    parser.add_argument("--dp", default="off,on", help="off, on or off,on")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--attacks",
        default=",".join(("clean", *TABLE_ATTACKS)),
        help="'clean' is the run without attack (measured with fedavg only)",
    )
    add_seeds_option(parser)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", type=Path, default=RESULTS / "attacks.json")
    options = parser.parse_args()
    runs_dir = RESULTS / "attack-runs" / time.strftime("%Y%m%d-%H%M%S")
    planned = [
        (None if attack == "clean" else attack, strategy, dp, _rounds(options.rounds, dp), seed, runs_dir)
        for dp in options.dp.split(",")
        for strategy in options.strategies.split(",")
        for attack in options.attacks.split(",")
        if attack != "clean" or strategy == "fedavg"
        for seed in options.seeds
    ]
    cells: list[dict[str, Any]] = []
    for cell in in_parallel(run_cell, planned, options.jobs):
        print(json.dumps(cell), flush=True)
        cells.append(cell)
        _write(options.out, cells)
    print(markdown_table(cells))


def _rounds(rounds: int, dp: str) -> int:
    return rounds or load_plan(SIMULATIONS_DIR / DP_SETTINGS[dp], []).run.training.rounds


def _write(out: Path, cells: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "sites": SITES, "hostile": HOSTILE, "cells": cells}
    out.write_text(json.dumps(record, indent=2) + "\n")


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """Accuracy per attack (rows) and strategy (columns), the mean over seeds with its range;
    backdoor cells add the success rate, and the last row is each strategy's largest loss
    against the clean FedAvg run (the goal of issue 22: at most 0.03 under DP)."""
    lines = []
    for dp in sorted({c["dp"] for c in cells}):
        mine = [c for c in cells if c["dp"] == dp and "error" not in c]
        strategies = list(dict.fromkeys(c["strategy"] for c in mine))
        lines += [
            f"DP {dp}, seeds {seeds_of(mine)}",
            "",
            "| attack | " + " | ".join(strategies) + " |",
            "| --- |" + " --- |" * len(strategies),
        ]
        clean = _mean([c for c in mine if c["attack"] == "clean"], "accuracy")
        worst: dict[str, float] = {}
        for attack in dict.fromkeys(c["attack"] for c in mine):
            row = []
            for strategy in strategies:
                runs = [c for c in mine if c["attack"] == attack and c["strategy"] == strategy]
                row.append(_cell_text(runs))
                if runs and attack != "clean" and clean is not None:
                    worst[strategy] = max(
                        worst.get(strategy, 0.0), clean - statistics.mean(c["accuracy"] for c in runs)
                    )
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
        gaps = [f"{worst[s]:.3f}" if s in worst else "" for s in strategies]
        lines += ["| largest loss against clean | " + " | ".join(gaps) + " |", ""]
        failed = [c for c in cells if c["dp"] == dp and "error" in c]
        lines += [f"failed: {c['strategy']} {c['attack']} seed {c['seed']}: {c['error']}" for c in failed]
    return "\n".join(lines)


def _mean(runs: list[dict[str, Any]], key: str) -> float | None:
    return statistics.mean(c[key] for c in runs) if runs else None


def _cell_text(runs: list[dict[str, Any]]) -> str:
    """Mean (min-max) over the seeds; 'rejected' when the checks rejected every hostile reply
    of every round in every run, 'stopped' when a run ended early."""
    if not runs:
        return ""
    text = mean_and_range([c["accuracy"] for c in runs])
    if "backdoor_success" in runs[0]:
        text += f", ASR {_mean(runs, 'backdoor_success'):.2f}"
    if all(sorted(c["rejected"].values()) == [c["rounds"]] * HOSTILE for c in runs):
        text += ", rejected"
    if any(c["stop_reason"] for c in runs):
        text += ", stopped"
    return text


if __name__ == "__main__":
    main()
