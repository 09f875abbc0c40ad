"""`cohort audit empirical` on real simulations (the twin runs of conftest.py): it finds
the leakage of a run without DP, stays at or below the accountant's epsilon on a DP run,
and refuses what it cannot audit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from server.held_out import federated_split
from server.run_config import DataConfig
from simulations.federation import simulated_site_data
from tests.conftest import COHORT

ENV = {**os.environ, "COLUMNS": "80"}


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COHORT, "audit", *args], capture_output=True, text=True, timeout=300, env=ENV, check=False)


def test_canaries_come_from_the_test_split_and_half_join_the_canary_site() -> None:
    config = DataConfig(audit_canaries=100)
    plain, audited = federated_split(DataConfig()), federated_split(config)
    assert audited.canaries is not None
    assert len(audited.test) == len(plain.test) - 100
    assert 30 < audited.canaries.included.sum() < 70
    with_canaries = simulated_site_data(config, 0, 3).train
    without = simulated_site_data(DataConfig(), 0, 3).train
    assert len(with_canaries) == len(without) + audited.canaries.included.sum()
    assert len(simulated_site_data(config, 1, 3).train) == len(simulated_site_data(DataConfig(), 1, 3).train)


def test_every_canary_carries_a_wrong_label() -> None:
    config = DataConfig(audit_canaries=100)
    canaries = federated_split(config).canaries
    assert canaries is not None
    plain_test = federated_split(DataConfig()).test
    for image, label in zip(canaries.examples.images, canaries.examples.labels, strict=True):
        (match,) = np.flatnonzero((plain_test.images == image).all(axis=(1, 2, 3)))[:1]
        assert plain_test.labels[match] != label


def test_audit_finds_clear_leakage_without_dp(non_private_run: Path) -> None:
    result = _audit("empirical", str(non_private_run))
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((non_private_run / "empirical_audit.json").read_text())
    assert saved["accountant_epsilon"] is None
    assert saved["epsilon_lower_bound"] > 0.5, saved
    assert "no DP at site-0" in result.stdout


def test_audit_stays_within_the_accountants_epsilon_with_dp(private_run: Path) -> None:
    result = _audit("empirical", str(private_run))
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((private_run / "empirical_audit.json").read_text())
    assert 0 < saved["accountant_epsilon"] <= 8.0
    assert saved["epsilon_lower_bound"] <= saved["accountant_epsilon"]
    assert not saved["contradicts_accountant"]


def test_audit_report_shows_the_bound_beside_the_accountant(private_run: Path) -> None:
    assert _audit("empirical", str(private_run)).returncode == 0
    result = _audit(str(private_run))
    assert result.returncode == 0, result.stderr
    report = json.loads((private_run / "audit.json").read_text())
    assert report["empirical"]["site"] == "site-0"
    assert "empirical audit: site-0" in result.stdout
    assert "Empirical privacy audit" in (private_run / "audit.html").read_text()


def test_every_line_of_the_audit_fits_80_columns(private_run: Path) -> None:
    result = _audit(str(private_run))
    assert result.returncode == 0, result.stderr
    too_wide = [line for line in result.stdout.splitlines() if len(line) > 80 and not line.startswith("wrote ")]
    assert not too_wide
    assert "RuntimeWarning" not in result.stderr


def test_a_run_without_canaries_is_refused_with_the_fix(private_run: Path, tmp_path: Path) -> None:
    config = json.loads((private_run / "config.json").read_text())
    config["run_config"]["audit-canaries"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _audit("empirical", str(tmp_path))
    assert result.returncode == 2
    assert "audit-canaries=" in result.stderr


def test_too_few_guesses_for_any_bound_are_refused(private_run: Path) -> None:
    result = _audit("empirical", str(private_run), "--guesses", "4")
    assert result.returncode == 2
    assert "cannot show any leakage" in result.stderr
