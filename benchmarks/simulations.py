"""Accuracy, privacy and wall time of the ready-made simulations, and the cost of
federation against centralised training of the same model on the same data.

Runs the real `cohort simulate` for each config, then (side by side, in the same
process run) trains the same model centrally for the same number of sample passes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.training import train_locally
from common.data.dataset import LabeledImages
from common.evaluation import evaluate
from common.models.registry import build_model
from common.privacy.noise import noise_source
from server.held_out import federated_split
from server.rundir import RunDirectory
from simulations.federation import simulated_site_data
from simulations.plan import SIMULATIONS_DIR, load_plan

COHORT = str(Path(sys.executable).parent / "cohort")


def run_simulation(config: str, runs_dir: Path, settings: tuple[str, ...] = (), cohort: str = COHORT) -> dict[str, Any]:
    """One `cohort simulate` of `config` (a file name in simulations/, or a path), with
    `--set` settings, by the given cohort command (another checkout's, to compare)."""
    before = set(runs_dir.glob("*")) if runs_dir.exists() else set()
    started = time.perf_counter()
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    subprocess.run(
        [cohort, "simulate", str(SIMULATIONS_DIR / config), *overrides, "--runs-dir", str(runs_dir)],
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - started
    (run_dir,) = set(runs_dir.glob("*")) - before
    summary = RunDirectory(run_dir).read_summary()
    assert summary is not None and summary.final_accuracy is not None
    metrics = RunDirectory(run_dir).read_metrics()
    return {
        "config": config,
        "final_accuracy": round(summary.final_accuracy, 4),
        "max_epsilon": None if summary.max_epsilon is None else round(summary.max_epsilon, 3),
        "client_level_epsilon": None
        if summary.client_level_epsilon is None
        else round(summary.client_level_epsilon, 3),
        "wall_seconds": round(wall, 1),
        "round_seconds": round(sum(m.seconds for m in metrics), 1),
        "run_dir": str(run_dir),
    }


def central_training(config: str) -> dict[str, Any]:
    """The same model on all sites' training data pooled, for the same sample passes."""
    plan = load_plan(SIMULATIONS_DIR / config, [])
    run = plan.run
    sites = [simulated_site_data(run.data, i, plan.num_sites) for i in range(plan.num_sites)]
    pooled = LabeledImages(
        np.concatenate([s.train.images for s in sites]), np.concatenate([s.train.labels for s in sites])
    )
    split = federated_split(run.data)
    torch.manual_seed(run.data.seed)
    model = build_model(run.training.model, split.input_shape, split.num_classes)
    central = dataclasses.replace(
        run, training=dataclasses.replace(run.training, local_epochs=run.training.rounds * run.training.local_epochs)
    )
    started = time.perf_counter()
    train_locally(
        model, pooled, central, None, torch.device("cpu"), noise_source(run.noise_source, run.data.seed, "central")
    )
    seconds = time.perf_counter() - started
    return {
        "config": config,
        "sample_passes": central.training.local_epochs * len(pooled),
        "seconds": round(seconds, 2),
        "accuracy": round(evaluate(model, split.test, torch.device("cpu")).accuracy, 4),
    }


def run(runs_dir: Path) -> dict[str, Any]:
    results = [
        run_simulation(config, runs_dir)
        for config in ("default.toml", "no-dp.toml", "transformer.toml", "client-level.toml")
    ]
    central = central_training("no-dp.toml")
    no_dp = next(r for r in results if r["config"] == "no-dp.toml")
    return {
        "simulations": results,
        "central_no_dp": central,
        "federated_over_central": {
            "whole_run": round(no_dp["wall_seconds"] / central["seconds"], 1),
            "rounds_only": round(no_dp["round_seconds"] / central["seconds"], 1),
        },
    }
