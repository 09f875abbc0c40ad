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
from simulations.fairness import accuracy_interval, below_the_mean, disparity
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


def _scored(correct: int, total: int) -> dict:
    return {"accuracy": correct / total, "val_examples": total}


def test_site_far_below_the_mean_beyond_chance_is_warned_about() -> None:
    sites = {"a": _scored(90, 100), "b": _scored(60, 100), "c": _scored(90, 100)}
    (warning,) = below_the_mean(sites, mean=0.8, margin=0.1)
    assert warning.startswith("b is 0.200 below the mean")


def test_every_site_below_the_mean_beyond_chance_is_warned_about_worst_first() -> None:
    sites = {"a": _scored(95, 100), "b": _scored(60, 100), "c": _scored(50, 100), "d": _scored(95, 100)}
    warnings = below_the_mean(sites, mean=0.75, margin=0.05)
    assert [w.split()[0] for w in warnings] == ["c", "b"]


def test_site_with_one_wrong_validation_image_is_not_warned_about() -> None:
    # The client-level simulation's devices validate on one image each.
    sites = {f"device-{i}": _scored(1, 1) for i in range(99)} | {"device-99": _scored(0, 1)}
    assert below_the_mean(sites, mean=0.99, margin=0.05) == []


def test_site_below_the_margin_whose_interval_reaches_the_mean_is_not_warned_about() -> None:
    sites = {"a": _scored(9, 10), "b": _scored(6, 10)}
    assert below_the_mean(sites, mean=0.75, margin=0.1) == []


def test_the_interval_widens_with_the_number_of_sites_compared() -> None:
    # 22 of 30 is below a mean of 0.9 at 95% for one site, not at 95% for a hundred.
    assert accuracy_interval(22, 30)[1] < 0.9 < accuracy_interval(22, 30, confidence=1 - 0.05 / 100)[1]
    few = {"a": _scored(30, 30), "b": _scored(22, 30)}
    many = few | {f"c{i}": _scored(29, 30) for i in range(98)}
    assert below_the_mean(few, mean=0.9, margin=0.05) and not below_the_mean(many, mean=0.9, margin=0.05)


def test_site_within_the_margin_is_not_warned_about() -> None:
    sites = {"a": _scored(900, 1000), "b": _scored(850, 1000)}
    assert below_the_mean(sites, mean=0.875, margin=0.05) == []


def test_accuracy_interval_is_exact_at_one_example() -> None:
    low, high = accuracy_interval(0, 1)
    assert low == 0.0
    assert high == pytest.approx(0.975)


def test_compare_flags_the_sites_that_lose_more_than_the_median_site() -> None:
    rows = compare_sites(
        _site_report({"a": 0.80, "b": 0.50, "c": 0.85}), _site_report({"a": 0.90, "b": 0.90, "c": 0.90})
    )
    assert [(r["site"], round(r["difference"], 3), r["costs_more"]) for r in rows] == [
        ("a", -0.1, False),
        ("b", -0.4, True),
        ("c", -0.05, False),
    ]


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
    return subprocess.run(
        [COHORT, "compare", *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
        check=False,
    )


def test_compare_shows_each_sites_accuracy_under_both_twins(private_run: Path, non_private_run: Path) -> None:
    result = _compare(private_run, non_private_run)
    assert result.returncode == 0, result.stderr
    for site in ("site-0", "site-1", "site-2"):
        assert site in result.stdout
    assert "median A - B" in result.stdout


def test_compare_refuses_runs_of_different_datasets(private_run: Path, tmp_path: Path) -> None:
    config = json.loads((private_run / "config.json").read_text())
    config["run_config"]["dataset"] = "mnist-5k"
    config["run_config"]["pretrain-dataset"] = ""  # the twin's public data cannot be its own
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _compare(private_run, tmp_path)
    assert result.returncode == 2
    assert "use different data or splits (dataset 'digits' against 'mnist-5k')" in " ".join(result.stderr.split())
