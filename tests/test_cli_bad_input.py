"""`cohort simulate` on bad input: one clear line on stderr, exit code 2, no traceback,
and no run directory left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from server.checkpoint import Checkpoint
from server.run_config import RunConfig

runner = CliRunner()


def _simulate(tmp_path: Path, *args: str) -> tuple[int, str]:
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["simulate", *args, "--runs-dir", str(runs)])
    assert not runs.exists() or not any(runs.iterdir()), "bad input must not leave a run directory"
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=resnet", "unknown model 'resnet'"),
        ("dataset=imagenet", "unknown dataset 'imagenet'"),
        ("strategy=fedsgd", "unknown strategy 'fedsgd'"),
        ("site-epsilon=0", "site-epsilon is 0.0; it must be a finite number in (0, 1000]"),
        ("site-epsilon=-3", "site-epsilon is -3.0; it must be a finite number in (0, 1000]"),
        ("site-delta=1.5", "site-delta is 1.5; it must be a finite number in (0, 1)"),
        ("site-delta=0", "site-delta is 0.0; it must be a finite number in (0, 1)"),
        ("clip-norm=inf", "clip-norm is inf; it must be a finite number in (0, 1000]"),
        ("num-sites=inf", "num-sites is inf; it must be an integer"),
        ("gpus-per-site=nan", "gpus-per-site is nan; it must be a finite number in [0, 1024]"),
        ("dataset=/no/such/file.npz", "nor an existing path"),
        ("num-sites=5000", "5000 sites but only 1437 training examples"),
        ("rounds", "is not key=value"),
        ("attack=boost", "attack is set but attack-sites is not"),
        ("aggregation-weight=claimed", "unknown aggregation-weight 'claimed'"),
        ("ray-address=ray://head:10001", "ray-address is 'ray://head:10001'; give the head node's HOST:PORT"),
        ("ray-address=6379", "ray-address is 6379; give it as a string"),
        ("ray-address='127.0.0.1:9'", "no Ray cluster answers at ray-address 127.0.0.1:9"),
        ("pretrain-dataset=digits", "pretrain-dataset is the run's own dataset 'digits'"),
        ("pretrain-dataset=/no/such/public.npz", "nor an existing path"),
        ("pretrain-epochs=0", "pretrain-epochs is 0"),
    ],
)
def test_bad_setting_exits_2_with_one_line(tmp_path: Path, override: str, message: str) -> None:
    code, stderr = _simulate(tmp_path, "--set", override)
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert "Traceback" not in stderr


def test_npz_with_missing_keys_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((10, 8, 8), np.uint8))
    code, stderr = _simulate(tmp_path, "--set", f"dataset={bad}")
    assert code == 2 and "missing key(s) train_labels" in stderr


def test_npz_with_mismatched_shapes_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((10, 8, 8), np.uint8), train_labels=np.zeros(9, np.int64))
    code, stderr = _simulate(tmp_path, "--set", f"dataset={bad}")
    assert code == 2 and "10 images but 9 labels" in stderr


def test_missing_simulation_config_exits_2(tmp_path: Path) -> None:
    code, stderr = _simulate(tmp_path, str(tmp_path / "nope.toml"))
    assert code == 2 and "does not exist; ready-made ones: client-level.toml, default.toml" in stderr


def _fake_run_dir(tmp_path: Path, run: RunConfig) -> Path:
    """A run directory as a crashed run leaves it: config, plan, one checkpoint."""
    from server.rundir import RunDirectory, write_json_atomic

    run_dir = RunDirectory(tmp_path / "crashed")
    run_dir.prepare(run)
    write_json_atomic(run_dir.path / "simulation.json", {"num-sites": 3, "cpus-per-site": 1, "gpus-per-site": 0.0})
    return run_dir.path


def test_resume_from_a_corrupt_checkpoint_exits_2(tmp_path: Path) -> None:
    run_dir = _fake_run_dir(tmp_path, RunConfig())
    (run_dir / "checkpoints" / "round-0001.pt").write_bytes(b"\x00garbage")
    code, stderr = _simulate(tmp_path, "--resume", str(run_dir))
    assert code == 2 and "round-0001.pt is corrupt" in stderr


def test_resume_from_a_checkpoint_of_another_config_exits_2(tmp_path: Path) -> None:
    run_dir = _fake_run_dir(tmp_path, RunConfig())
    other = RunConfig.from_flower({"learning-rate": 0.01})
    Checkpoint(1, {"w": torch.zeros(2)}, other.fingerprint(), "{}", {}, "{}").save(run_dir / "checkpoints")
    code, stderr = _simulate(tmp_path, "--resume", str(run_dir))
    assert code == 2 and "written by a different run config" in stderr


def test_resume_of_a_directory_that_is_no_run_exits_2(tmp_path: Path) -> None:
    code, stderr = _simulate(tmp_path, "--resume", str(tmp_path))
    assert code == 2 and "is not a Cohort run directory" in stderr


def test_installed_command_prints_no_traceback_on_bad_input(tmp_path: Path) -> None:
    cohort = Path(sys.executable).parent / "cohort"
    result = subprocess.run(
        [str(cohort), "simulate", "--set", "model=resnet", "--runs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown model 'resnet'; choose one of: cnn, scatternet, transformer"


@pytest.mark.parametrize("command", [["--help"], ["simulate", "--help"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "Usage" in result.stdout


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["num-sites=10", "strategy=bulyan", "byzantine-sites=2"],
            "needs at least 11 sites training each round, the run has 10",
        ),
        (["strategy=krum", "dp-level=client"], "plain mean"),
        (["attack=boost", "attack-sites=[7]", "num-sites=3"], "attack-sites [7] are not sites of this simulation"),
    ],
)
def test_impossible_combination_exits_2_with_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    code, stderr = _simulate(tmp_path, *[arg for override in overrides for arg in ("--set", override)])
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
