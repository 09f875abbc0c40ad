"""Who the model works for: the final global model scored on every simulated site's own
held-out data, with the disparity across sites.

DP-SGD costs small and under-represented sites the most accuracy (Bagdasaryan et al.,
NeurIPS 2019): a site whose data fits one batch needs more noise for the same budget.
The server's test set averages that away, so each site is scored on its own validation
split. Sites' splits are small, so every per-site accuracy comes with its exact 95%
(Clopper-Pearson) interval (scipy), which holds for a handful of examples, even one, where
a bootstrap says nothing, and costs nothing at a thousand sites (fairlearn's bootstrap
took minutes there). Exact, not Wilson's: Wilson's interval is too narrow at a few
examples (one wrong image gives [0, 0.79]), and a warning must not fire on a site that
was merely unlucky in the one image it holds.
Simulation only: a deployed site's data never leaves it.

fairness.json, schema "cohort-fairness/1":
    sites: {name: {accuracy, accuracy_ci: [low, high] (95% exact), loss, val_examples,
        train_examples, label_mix: [train examples per class]}}
    across_sites: {mean, worst_site, worst, best_site, best, spread (best - worst), std,
        worst_over_best}
    test_accuracy_by_class: [accuracy on the server's test set, per true class]
    margin, warnings: [one per site more than `margin` below the mean whose whole
        interval lies below the mean (95% for all sites together), worst first]
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from fairlearn.metrics import MetricFrame
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score

from common.errors import CohortInputError
from common.evaluation import predict
from common.private_files import private_dir
from server.held_out import federated_split
from server.records import RoundRecord
from server.rundir import RunDirectory, write_bytes_atomic, write_json_atomic
from simulations.federation import simulated_site_data
from simulations.plan import saved_plan

SCHEMA = "cohort-fairness/1"
FAIRNESS_FILE = "fairness.json"
PLOT_FILE = "site_accuracy.png"
CONFIDENCE = 0.95


def write_fairness(run_dir: Path, margin: float) -> dict[str, Any]:
    """Measure, then write fairness.json and plots/site_accuracy.png."""
    directory = RunDirectory(run_dir)
    report = measure_fairness(directory, margin)
    write_json_atomic(run_dir / FAIRNESS_FILE, report)
    private_dir(directory.plot_dir)
    write_bytes_atomic(
        directory.plot_dir / PLOT_FILE,
        _site_accuracy_plot(directory.read_metrics(), report["across_sites"]["worst_site"]),
    )
    return report


def measure_fairness(directory: RunDirectory, margin: float) -> dict[str, Any]:
    run = directory.read_config()
    plan = saved_plan(directory.path, run)
    split = federated_split(run.data)
    model = directory.final_model(run, split.input_shape, split.num_classes)
    device = torch.device("cpu")
    sites = {}
    for site_id in range(plan.num_sites):
        data = simulated_site_data(run.data, site_id, plan.num_sites, str(directory.path))
        predictions = predict(model, data.val, device)
        correct = int((predictions.classes == data.val.labels).sum())
        sites[f"site-{site_id}"] = {
            "accuracy": correct / len(data.val),
            "accuracy_ci": accuracy_interval(correct, len(data.val)),
            "loss": float(predictions.losses.mean()),
            "val_examples": len(data.val),
            "train_examples": len(data.train),
            "label_mix": np.bincount(data.train.labels, minlength=split.num_classes).tolist(),
        }
    test = predict(model, split.test, device)
    across = disparity({name: site["accuracy"] for name, site in sites.items()})
    return {
        "schema": SCHEMA,
        "model": "the final global model, on each site's own validation split",
        "sites": {name: sites[name] for name in sorted(sites)},
        "across_sites": across,
        "test_accuracy_by_class": _accuracy_by_class(split.test.labels, test.classes, split.num_classes),
        "margin": margin,
        "warnings": below_the_mean(sites, across["mean"], margin),
    }


def accuracy_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> list[float]:
    """The exact (Clopper-Pearson) interval of an accuracy of `correct` out of `total`."""
    interval = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="exact")
    return [float(interval.low), float(interval.high)]


def disparity(accuracy_by_site: dict[str, float]) -> dict[str, Any]:
    """The across-site figures a reader compares: who is worst off, and by how much."""
    if not accuracy_by_site:
        raise CohortInputError("no site to compare: the run has no sites")
    worst_site = min(accuracy_by_site, key=lambda name: (accuracy_by_site[name], name))
    best_site = max(accuracy_by_site, key=lambda name: (accuracy_by_site[name], name))
    values = np.array(list(accuracy_by_site.values()))
    worst, best = accuracy_by_site[worst_site], accuracy_by_site[best_site]
    return {
        "mean": float(values.mean()),
        "worst_site": worst_site,
        "worst": worst,
        "best_site": best_site,
        "best": best,
        "spread": best - worst,
        "std": float(values.std()),
        "worst_over_best": worst / best if best > 0 else None,
    }


def below_the_mean(sites: dict[str, dict[str, Any]], mean: float, margin: float) -> list[str]:
    """Warnings for the sites the model serves worse than the mean site, beyond chance.

    A site is named when its accuracy is more than `margin` below the mean and its whole
    interval lies below the mean too, the interval taken at 95% for all sites together
    (Bonferroni: each at 1 - 0.05/n). Per site at 95%, a hundred devices of one image each
    would name the few that got theirs wrong by chance; an unlucky draw among many sites is
    not evidence that the model serves one of them worse.
    """
    confidence = 1 - (1 - CONFIDENCE) / max(len(sites), 1)
    flagged = []
    for name, site in sites.items():
        correct = round(site["accuracy"] * site["val_examples"])
        low, high = accuracy_interval(correct, site["val_examples"], confidence)
        if mean - site["accuracy"] > margin and high < mean:
            flagged.append((mean - site["accuracy"], name, site["accuracy"], low, high))
    return [
        f"{name} is {gap:.3f} below the mean site accuracy ({accuracy:.3f} against {mean:.3f}; {low:.3f} to "
        f"{high:.3f} at 95% for all {len(sites)} sites together; fairness-margin {margin:g}): the model serves it worse"
        for gap, name, accuracy, low, high in sorted(flagged, key=lambda flag: (-flag[0], flag[1]))
    ]


def _accuracy_by_class(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[float | None]:
    frame = MetricFrame(metrics=accuracy_score, y_true=labels, y_pred=predicted, sensitive_features=labels)
    return [float(frame.by_group[c]) if c in frame.by_group.index else None for c in range(num_classes)]


def read_fairness(run_dir: Path) -> dict[str, Any] | None:
    file = run_dir / FAIRNESS_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CohortInputError(
            f"{file} is corrupt ({error}); delete it and run `cohort compare` again to remeasure"
        ) from None


def _site_accuracy_plot(metrics: list[RoundRecord], worst_site: str) -> bytes:
    figure, axes = plt.subplots(figsize=(7, 4.2))
    names = sorted({name for record in metrics for name in record.sites})
    for name in names:
        points = [
            (m.round, m.sites[name].val_accuracy)
            for m in metrics
            if name in m.sites and m.sites[name].val_accuracy is not None
        ]
        if not points:
            continue
        worst = name == worst_site
        axes.plot(
            *zip(*points, strict=True),
            color="#c0392b" if worst else "#999",
            linewidth=2.5 if worst else 1,
            zorder=3 if worst else 2,
            label=f"{name} (worst)" if worst else None,
        )
    axes.set(
        xlabel="round",
        ylabel="validation accuracy of the global model",
        title="Accuracy by site and round",
        ylim=(0, 1.02),
    )
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
