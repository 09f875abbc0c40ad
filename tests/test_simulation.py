"""End to end on Flower's simulation engine: `cohort simulate` runs a real federation,
writes a complete run directory, survives Ctrl-C, resumes with epsilon continuing, and
leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.privacy.accounting import PrivacyState

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

COHORT = str(Path(sys.executable).parent / "cohort")
SMALL = ["--set", "num-sites=3", "--set", "local-epochs=1"]


def _run_dir(runs: Path) -> Path:
    (run_dir,) = list(runs.iterdir())
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    runs = tmp_path_factory.mktemp("runs")
    result = subprocess.run(
        [COHORT, "simulate", *SMALL, "--set", "rounds=2", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, _run_dir(runs)


def test_simulation_writes_a_complete_run_directory(completed_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run_dir = completed_run
    for name in ("config.json", "metrics.jsonl", "privacy_ledger.jsonl", "model.pt", "summary.json", "plots/accuracy.png", "plots/epsilon.png", "checkpoints/round-0001.pt", "checkpoints/round-0002.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "plots/accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_metrics_have_one_line_a_round_with_every_site(completed_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run_dir = completed_run
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    for record in metrics:
        assert set(record["sites"]) == {"site-0", "site-1", "site-2"}
        assert 0.0 <= record["global"]["accuracy"] <= 1.0
        assert all(0 < site["epsilon"] <= 8.0 for site in record["sites"].values())


def test_ledger_has_one_record_per_site_per_round_that_recomputes_to_its_epsilon(completed_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run_dir = completed_run
    records = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["site"]) for r in records) == [(r, f"site-{s}") for r in (1, 2) for s in range(3)]
    for site in ("site-0", "site-1", "site-2"):
        mine = sorted((r for r in records if r["site"] == site), key=lambda r: r["round"])
        history = tuple((r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in mine)
        recomputed = PrivacyState(mine[0]["noise_multiplier"], mine[0]["sample_rate"], "rdp", history).epsilon(mine[-1]["delta"])
        assert recomputed == pytest.approx(mine[-1]["epsilon"], rel=1e-9)


def test_progress_and_summary_are_printed(completed_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, _ = completed_run
    assert "round   1/2" in result.stdout and "round   2/2" in result.stdout
    assert "global test accuracy" in result.stdout and "site-2" in result.stdout


def test_interrupted_run_resumes_at_the_next_round_with_epsilon_continuing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [COHORT, "simulate", *SMALL, "--set", "rounds=3", "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (runs.exists() and any(runs.iterdir()) and (_run_dir(runs) / "checkpoints" / "round-0001.pt").exists()):
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    run_dir = _run_dir(runs)
    assert not (run_dir / "summary.json").exists()
    done = max(m["round"] for m in _metrics(run_dir))
    assert done < 3

    resumed = subprocess.run([COHORT, "simulate", "--resume", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    for site in ("site-0", "site-1", "site-2"):
        epsilons = [m["sites"][site]["epsilon"] for m in metrics]
        assert epsilons[0] < epsilons[1] < epsilons[2] <= 8.0
    ledger = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    site0 = sorted((r for r in ledger if r["site"] == "site-0"), key=lambda r: r["round"])
    history = tuple((r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in site0)
    continuous = PrivacyState(site0[0]["noise_multiplier"], site0[0]["sample_rate"], "rdp", history)
    assert site0[-1]["epsilon"] == pytest.approx(continuous.epsilon(site0[-1]["delta"]), rel=1e-9)
