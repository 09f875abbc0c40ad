"""`cohort audit empirical` catches a broken DP implementation and raises no false alarm.

Small federations in one process (simulations.in_process: the real ServerApp, ClientApps,
Opacus and ledgers, without Flower's transport) at a claimed epsilon of 1. In one, every
site draws a twentieth of the noise it planned and recorded: a DP bug, injected through
the in-process sites' noise source (simulations.injected_bug), which no Flower simulation
or deployed site runs. The others are correct, over seeds. The audit scores its default
canaries (gradient-space) on its default observer (the canary site's update of every
round).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore.task_identity import TaskIdentity

from audit.empirical import audit_run, verdict
from simulations.in_process import run_in_process
from simulations.injected_bug import noise_cut_to
from tests.conftest import COHORT

SITES = 3
CLAIMED = {"site-epsilon": 1.0, "rounds": 5, "batch-size": 32, "audit-canaries": 100, "noise-source": "seeded"}
NOISE_SHARE = 0.05
BUGGY_SEED = 42
CORRECT_SEEDS = (BUGGY_SEED, 7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One buggy run and the correct ones, each its own run directory."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    root = tmp_path_factory.mktemp("audited")
    paths = {}
    with noise_cut_to(NOISE_SHARE):
        paths["buggy"] = _run(root / "buggy", {**CLAIMED, "seed": BUGGY_SEED})
    for seed in CORRECT_SEEDS:
        paths[f"seed-{seed}"] = _run(root / f"seed-{seed}", {**CLAIMED, "seed": seed})
    yield paths
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _run(path: Path, settings: dict[str, Any]) -> Path:
    grid = run_in_process(settings, SITES, path)
    assert not grid.stopped, grid.stopped
    return path


def _audit_empirical(run_dir: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = subprocess.run(
        [COHORT, "audit", "empirical", str(run_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
    )
    return result, json.loads((run_dir / "empirical_audit.json").read_text())


def test_a_site_adding_a_twentieth_of_its_recorded_noise_is_a_privacy_bug(runs: dict[str, Path]) -> None:
    result, saved = _audit_empirical(runs["buggy"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PRIVACY BUG at site-0" in result.stdout
    assert saved["accountant_epsilon"] <= 1.0 < saved["epsilon_lower_bound"]
    assert saved["contradicts_accountant"]


def test_the_buggy_sites_ledger_records_the_noise_they_planned(runs: dict[str, Path]) -> None:
    """Nothing but the audit can see this bug: the ledger says what the correct twin's says."""
    buggy, correct = _noise_recorded(runs["buggy"]), _noise_recorded(runs[f"seed-{BUGGY_SEED}"])
    assert buggy == correct
    assert len(buggy) == SITES * CLAIMED["rounds"] and min(buggy.values()) > 0


def _noise_recorded(run_dir: Path) -> dict[tuple[str, int], float]:
    """Each site's recorded noise multiplier, per round."""
    lines = (run_dir / "privacy_ledger.jsonl").read_text().splitlines()
    records = [json.loads(line)["record"] for line in lines]
    return {(r["site"], r["round"]): r["noise_multiplier"] for r in records if r["kind"] == "release"}


@pytest.mark.parametrize("seed", CORRECT_SEEDS)
def test_a_correct_run_stays_within_its_accountants_epsilon(runs: dict[str, Path], seed: int) -> None:
    """In this process: the command's cost is its imports, which the buggy run's test measured."""
    result = audit_run(runs[f"seed-{seed}"])
    assert result.accountant_epsilon is not None and result.accountant_epsilon <= 1.0
    assert result.epsilon_lower_bound <= result.accountant_epsilon
    assert not verdict(result).startswith("PRIVACY BUG")
