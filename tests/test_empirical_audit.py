"""`cohort audit empirical` on real simulations (the twin runs of conftest.py): it finds
the leakage of a run without DP, stays at or below the accountant's epsilon on a DP run,
and refuses what it cannot audit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.errors import CohortInputError
from server.held_out import federated_split, gradient_canaries
from server.run_config import DataConfig, RunConfig
from simulations.federation import simulated_site_data, write_site_files
from tests.conftest import COHORT

ENV = {**os.environ, "COLUMNS": "80"}


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COHORT, "audit", *args], capture_output=True, text=True, timeout=300, env=ENV, check=False)


def test_input_canaries_come_from_the_test_split_and_half_join_the_canary_site() -> None:
    config = DataConfig(audit_canaries=100, audit_canary_kind="input")
    plain, audited = federated_split(DataConfig()), federated_split(config)
    assert audited.canaries is not None
    assert len(audited.test) == len(plain.test) - 100
    assert 30 < audited.canaries.included.sum() < 70
    with_canaries = simulated_site_data(config, 0, 3).train
    without = simulated_site_data(DataConfig(), 0, 3).train
    assert len(with_canaries) == len(without) + audited.canaries.included.sum()
    assert len(simulated_site_data(config, 1, 3).train) == len(simulated_site_data(DataConfig(), 1, 3).train)


def test_gradient_canaries_are_distinct_coordinates_and_half_join_the_canary_site(tmp_path: Path) -> None:
    run = RunConfig(data=DataConfig(audit_canaries=100))
    canaries = gradient_canaries(run)
    assert canaries is not None
    assert len(set(canaries.coordinates.tolist())) == 100
    assert 30 < canaries.included.sum() < 70
    assert len(federated_split(run.data).test) == len(federated_split(DataConfig()).test)
    write_site_files(run.data, 3, tmp_path, canaries)
    held = [simulated_site_data(run.data, site, 3, str(tmp_path)).gradient_canaries for site in range(3)]
    assert held[0] is not None and sorted(held[0]) == sorted(canaries.coordinates[canaries.included])
    assert held[1] is None and held[2] is None


def test_every_input_canary_carries_a_wrong_label() -> None:
    config = DataConfig(audit_canaries=100, audit_canary_kind="input")
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
    assert "bound from gradient-space (Dirac) canaries scored on the canary site's update of every round" in " ".join(
        result.stdout.split()
    )


def test_audit_stays_within_the_accountants_epsilon_with_dp(private_run: Path) -> None:
    result = _audit("empirical", str(private_run))
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((private_run / "empirical_audit.json").read_text())
    assert 0 < saved["accountant_epsilon"] <= 8.0
    assert saved["epsilon_lower_bound"] <= saved["accountant_epsilon"]
    assert not saved["contradicts_accountant"]


def test_audit_report_shows_the_bound_its_source_and_its_scope_beside_the_accountant(private_run: Path) -> None:
    assert _audit("empirical", str(private_run)).returncode == 0
    result = _audit(str(private_run))
    assert result.returncode == 0, result.stderr
    report = json.loads((private_run / "audit.json").read_text())
    empirical = report["empirical"]
    assert empirical["site"] == "site-0"
    assert (empirical["observer"], empirical["canary_kind"]) == ("transcript", "dirac")
    can, cannot = empirical["scope"]
    assert can.startswith("can show:") and "bug in the DP implementation" in can
    assert cannot.startswith("cannot show: that the run is private") and "most 150 canaries and 36 guesses" in cannot
    shown = " ".join(result.stdout.split())
    assert "empirical audit: site-0" in shown
    assert f"bound from {empirical['source']}" in shown and can in shown and cannot in shown
    page = (private_run / "audit.html").read_text()
    assert "Empirical privacy audit" in page
    assert "gradient-space (Dirac) canaries" in page


def test_the_coordinator_keeps_the_canary_sites_update_of_every_round(private_run: Path) -> None:
    kept = sorted(path.name for path in (private_run / "audit-transcript").iterdir())
    assert kept == ["round-0001.pt", "round-0002.pt", "round-0003.pt"]


def test_a_deployed_run_refuses_to_keep_a_transcript() -> None:
    result = CliRunner().invoke(app, ["run", "nowhere", "--set", "audit-canaries=100"])
    assert result.exit_code == 2
    assert "only a simulation may do" in " ".join(result.stderr.split())


def test_secure_aggregation_refuses_the_transcript_observer_it_hides() -> None:
    with pytest.raises(CohortInputError, match="audit-observer"):
        RunConfig.from_flower({"secure-aggregation": True, "audit-canaries": 100})


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
