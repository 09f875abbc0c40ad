"""Who the model works for: the fairness report of a run, and `cohort compare`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cli.compare import compare_sites
from common.errors import CohortInputError
from server.rundir import RunDirectory
from simulations.fairness import _warnings, disparity
from tests.conftest import COHORT


def _site_report(accuracies: dict[str, float]) -> dict:
    return {"sites": {name: {"accuracy": accuracy} for name, accuracy in accuracies.items()}}


def test_disparity_names_the_worst_and_best_site_with_their_gap() -> None:
    across = disparity({"a": 0.9, "b": 0.6, "c": 0.75})
    assert (across["worst_site"], across["best_site"]) == ("b", "a")
    assert across["spread"] == pytest.approx(0.3)
    assert across["mean"] == pytest.approx(0.75)
    assert across["std"] == pytest.approx((0.15**2 * 2 / 3) ** 0.5)
    assert across["worst_over_best"] == pytest.approx(0.6 / 0.9)


def test_worst_site_far_below_the_mean_is_warned_about() -> None:
    (warning,) = _warnings(disparity({"a": 0.9, "b": 0.6, "c": 0.9}), margin=0.1)
    assert warning.startswith("b is 0.200 below the mean")


def test_worst_site_within_the_margin_is_not_warned_about() -> None:
    assert _warnings(disparity({"a": 0.9, "b": 0.85}), margin=0.05) == []


def test_compare_flags_the_sites_that_lose_more_than_the_median_site() -> None:
    rows = compare_sites(_site_report({"a": 0.80, "b": 0.50, "c": 0.85}), _site_report({"a": 0.90, "b": 0.90, "c": 0.90}))
    assert [(r["site"], round(r["difference"], 3), r["costs_more"]) for r in rows] == [("a", -0.1, False), ("b", -0.4, True), ("c", -0.05, False)]


def test_compare_refuses_runs_with_different_sites() -> None:
    with pytest.raises(CohortInputError, match="different sites"):
        compare_sites(_site_report({"a": 0.8}), _site_report({"b": 0.8}))


def test_simulation_writes_the_fairness_report_into_summary_and_plots(private_run: Path) -> None:
    report = json.loads((private_run / "fairness.json").read_text())
    assert set(report["sites"]) == {"site-0", "site-1", "site-2"}
    for site in report["sites"].values():
        low, high = site["accuracy_ci"]
        assert low <= site["accuracy"] <= high
        assert sum(site["label_mix"]) == site["train_examples"]
    summary = RunDirectory(private_run).read_summary()
    assert summary is not None and summary.fairness is not None
    assert summary.fairness["worst_site"] == report["across_sites"]["worst_site"]
    assert (private_run / "plots" / "site_accuracy.png").read_bytes().startswith(b"\x89PNG")


def _compare(*runs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COHORT, "compare", *map(str, runs)], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})


def test_compare_shows_each_sites_accuracy_under_both_twins(private_run: Path, non_private_run: Path) -> None:
    result = _compare(private_run, non_private_run)
    assert result.returncode == 0, result.stderr
    for site in ("site-0", "site-1", "site-2"):
        assert site in result.stdout
    assert "median A - B" in result.stdout


def test_compare_refuses_runs_of_different_datasets(private_run: Path, tmp_path: Path) -> None:
    config = json.loads((private_run / "config.json").read_text())
    config["run_config"]["dataset"] = "mnist-5k"
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _compare(private_run, tmp_path)
    assert result.returncode == 2
    assert "use different data or splits (dataset 'digits' against 'mnist-5k')" in " ".join(result.stderr.split())
