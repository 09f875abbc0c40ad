"""`cohort audit empirical` catches a broken DP implementation and raises no false alarm.

Small federations in one process (simulations.in_process: the real ServerApp, ClientApps,
Opacus and ledgers, without Flower's transport) at a claimed epsilon of 1. In one, every
site draws a twentieth of the noise it planned and recorded: a DP bug, injected through
the in-process sites' noise source (simulations.injected_bug), which no Flower simulation
or deployed site runs. The others are correct, over seeds. The audit scores its default
canaries (gradient-space) on its default observer (the canary site's update of every
round).

At client level the same bug is the coordinator's: its DP wrapper adds a twentieth of the
noise the server's ledger records, at a claimed client epsilon of 2, and the one-shot
estimate from canary clients (audit.one_shot) shows the run above its accountant; the
correct twin stays within it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore.task_identity import TaskIdentity

from audit.empirical import audit_run, verdict
from audit.one_shot import estimate_run
from simulations.in_process import run_in_process
from simulations.injected_bug import noise_cut_to
from tests.conftest import COHORT

SITES = 3
CLAIMED = {"site-epsilon": 1.0, "rounds": 5, "batch-size": 32, "audit-canaries": 100, "noise-source": "seeded"}
NOISE_SHARE = 0.05
BUGGY_SEED = 42
CORRECT_SEEDS = (BUGGY_SEED, 7)
# Client level: a small federation of client-level.toml's kind and its canary clients.
CLIENT_SITES = 3
CLIENT_LEVEL = {
    "dp-level": "client",
    "client-clipping": "adaptive",
    "client-epsilon": 2.0,
    "site-allow-non-private": True,
    "rounds": 3,
    "batch-size": 16,
    "learning-rate": 0.1,
    "audit-canary-clients": 50,
    "noise-source": "seeded",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One buggy run and the correct ones, each its own run directory."""
    root = tmp_path_factory.mktemp("audited")
    with _flower_task_identity():
        paths = {}
        with noise_cut_to(NOISE_SHARE):
            paths["buggy"] = _run(root / "buggy", {**CLAIMED, "seed": BUGGY_SEED}, SITES)
        for seed in CORRECT_SEEDS:
            paths[f"seed-{seed}"] = _run(root / f"seed-{seed}", {**CLAIMED, "seed": seed}, SITES)
        yield paths


@pytest.fixture(scope="module")
def client_level_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A client-level run whose server adds a twentieth of its recorded noise, and its correct twin."""
    root = tmp_path_factory.mktemp("estimated")
    with _flower_task_identity():
        with noise_cut_to(NOISE_SHARE):
            buggy = _run(root / "buggy", CLIENT_LEVEL, CLIENT_SITES)
        yield {"buggy": buggy, "correct": _run(root / "correct", CLIENT_LEVEL, CLIENT_SITES)}


@contextmanager
def _flower_task_identity() -> Iterator[None]:
    """The task identity Flower's ClientApp runtime would set, for the in-process sites' messages."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _run(path: Path, settings: dict[str, Any], sites: int) -> Path:
    grid = run_in_process(settings, sites, path)
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


def test_a_server_adding_a_twentieth_of_its_recorded_noise_shows_above_its_accountant(
    client_level_runs: dict[str, Path],
) -> None:
    result = subprocess.run(
        [COHORT, "audit", "empirical", str(client_level_runs["buggy"])],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stdout + result.stderr  # an estimate proves nothing: no exit 1
    assert "ABOVE THE ACCOUNTANT" in result.stdout
    saved = json.loads((client_level_runs["buggy"] / "one_shot_estimate.json").read_text())
    assert saved["accountant_epsilon"] <= 2.0 < saved["epsilon_low_end"] <= saved["epsilon_final"]
    assert saved["above_accountant"]


def test_the_buggy_servers_ledger_records_the_noise_it_planned(client_level_runs: dict[str, Path]) -> None:
    """Nothing but the estimate can see this bug: the server's ledger says what the correct twin's says."""
    buggy, correct = (_server_noise(client_level_runs[run]) for run in ("buggy", "correct"))
    assert buggy == correct
    assert len(buggy) == CLIENT_LEVEL["rounds"] and min(buggy) > 0


def _server_noise(run_dir: Path) -> list[float]:
    lines = (run_dir / "server" / "privacy_ledger.jsonl").read_text().splitlines()
    return [json.loads(line)["record"]["noise_multiplier"] for line in lines]


def test_a_correct_client_level_run_stays_within_its_accountants_epsilon(client_level_runs: dict[str, Path]) -> None:
    estimate = estimate_run(client_level_runs["correct"])
    assert estimate.accountant_epsilon is not None and estimate.accountant_epsilon <= 2.0
    assert estimate.inserted == CLIENT_LEVEL["audit-canary-clients"] and estimate.unclipped == 0
    assert estimate.epsilon_low_end <= estimate.accountant_epsilon
    assert not estimate.above_accountant
