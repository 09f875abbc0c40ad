"""PNG plots of a run, redrawn from metrics.jsonl so a resumed run plots every round."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from server.records import RoundRecord
from server.rundir import write_bytes_atomic


def plot_run(metrics: list[RoundRecord], out_dir: Path) -> list[Path]:
    return [_plot_accuracy(metrics, out_dir / "accuracy.png"), _plot_epsilon(metrics, out_dir / "epsilon.png")]


def _plot_accuracy(metrics: list[RoundRecord], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    rounds = [m.round for m in metrics]
    axes.plot(rounds, [m.accuracy for m in metrics], "k-o", linewidth=2, label="global (held-out test)")
    for site in _sites(metrics):
        points = [
            (m.round, m.sites[site].val_accuracy)
            for m in metrics
            if site in m.sites and m.sites[site].val_accuracy is not None
        ]
        if points:
            axes.plot(*zip(*points, strict=True), "--", alpha=0.7, label=f"{site} (local val)")
    axes.set(xlabel="round", ylabel="accuracy", title="Accuracy by round", ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    return _save(figure, path)


def _plot_epsilon(metrics: list[RoundRecord], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for site in _sites(metrics):
        points = [
            (m.round, m.sites[site].epsilon) for m in metrics if site in m.sites and m.sites[site].epsilon is not None
        ]
        if points:
            line = axes.plot(*zip(*points, strict=True), "-o", label=site)[0]
            plotted = True
            budget = next(
                (m.sites[site].budget for m in reversed(metrics) if site in m.sites and m.sites[site].budget), None
            )
            if budget is not None:
                axes.axhline(budget, color=line.get_color(), linestyle=":", alpha=0.6)
    if plotted:
        axes.set(title="Privacy spent by round (dotted: each site's budget)")
        axes.legend(fontsize="small", loc="lower right")
    else:
        axes.set(title="Trained without differential privacy: no epsilon to show")
    axes.set(xlabel="round", ylabel="epsilon")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _sites(metrics: list[RoundRecord]) -> list[str]:
    return sorted({site for m in metrics for site in m.sites})


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
    return path
