"""What a simulated site-round costs at 100 and 1,000 sites, against Flower's floor.

Each row is a real simulation through `simulations.runner` (a private SuperLink, Flower's
simulation engine, Cohort's ServerApp), run twice side by side: once with Cohort's
ClientApp and once with the do-nothing ClientApp of benchmarks/flower_floor.py under the
same server, so that the difference is what Cohort's sites add. Per row:

- seconds per round: the mean of the rounds after the first (the first includes Ray
  starting its workers and every worker's first imports);
- per site-round: that over the sites sampled to train (each also validates, since
  fraction-evaluate defaults to fraction-train's share);
- training compute: the same sites' local DP-SGD (or plain SGD) and validation timed in
  this process on one thread, as a Ray worker runs them; the goal is Cohort's per
  site-round within 3x the floor plus this;
- start-up: from the call to the first round's start;
- peak memory: the largest summed resident memory of every process the run started
  (SuperLink, SuperExec, flwr-simulation, Ray and its workers), sampled every 0.2 s.

    .venv/bin/python -m benchmarks.scale
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import psutil
import torch

from benchmarks.results import run_table
from client.policy import SiteConfig
from client.privacy_plan import plan_round
from client.site_data import SiteData
from client.training import train_locally
from common.evaluation import evaluate
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.noise import noise_source
from server.records import RoundRecord
from server.run_config import RunConfig
from server.strategies import sample_size
from simulations.federation import simulated_site_data
from simulations.plan import SimulationPlan, plan_from_values
from simulations.runner import new_run, run_simulation

FLOOR_CLIENTAPP = "benchmarks.flower_floor:app"
ROUNDS = 3
COMPUTE_SAMPLE = 20


@dataclass(frozen=True)
class Scale:
    name: str
    settings: dict[str, Any]


SCALES = (
    Scale("100 sites, DP-SGD", {"num-sites": 100, "dataset": "digits", "partitioner": "iid", "dp": True}),
    Scale(
        "100 sites, no DP",
        {"num-sites": 100, "dataset": "digits", "partitioner": "iid", "dp": False, "site-allow-non-private": True},
    ),
    Scale(
        "1,000 sites, 5% a round, DP-SGD",
        {"num-sites": 1000, "dataset": "mnist-5k", "partitioner": "iid", "dp": True, "fraction-train": 0.05},
    ),
)


class PeakMemory:
    """The largest summed RSS of this process's descendants while the `with` block runs."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # a process that ended between listing and reading
                    continue
            self.peak_bytes = max(self.peak_bytes, total)


def simulate(plan: SimulationPlan, runs_dir: Path, clientapp: str | None) -> dict[str, Any]:
    rounds: list[RoundRecord] = []
    first_round_end: list[float] = []

    def on_round(record: RoundRecord) -> None:
        rounds.append(record)
        if not first_round_end:
            first_round_end.append(time.perf_counter())

    started = time.perf_counter()
    with PeakMemory() as memory:
        outcome = run_simulation(new_run(plan, runs_dir), on_round, clientapp=clientapp)
    if not outcome.succeeded:
        raise RuntimeError(f"the {clientapp or 'Cohort'} run did not complete; see {outcome.log_file}")
    seconds = [r.seconds for r in sorted(rounds, key=lambda r: r.round)]
    return {
        "seconds_per_round": sum(seconds[1:]) / len(seconds[1:]),
        "first_round_seconds": seconds[0],
        "startup_seconds": first_round_end[0] - seconds[0] - started,
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_gb": memory.peak_bytes / 2**30,
    }


def training_compute_ms(plan: SimulationPlan) -> float:
    """One site's local training and validation, on one thread, as a simulation worker runs them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = plan.run
        sites = [simulated_site_data(run.data, i, plan.num_sites) for i in range(COMPUTE_SAMPLE)]
        privacy = _privacy_like_a_site(plan)
        _train_and_validate(sites[0], run, privacy)  # a worker's first call pays for one-off set-up
        started = time.perf_counter()
        for site in sites:
            _train_and_validate(site, run, privacy)
        return (time.perf_counter() - started) / len(sites) * 1000
    finally:
        torch.set_num_threads(threads)


def _train_and_validate(site: SiteData, run: RunConfig, privacy: PrivacyState | None) -> None:
    model = build_model(run.training.model, site.train.input_shape, site.num_classes)
    train_locally(
        model,
        site.train,
        run,
        privacy,
        torch.device("cpu"),
        noise_source(run.noise_source, run.data.seed, "scale", 2),
        server_round=2,
    )
    evaluate(model, site.val, torch.device("cpu"))


def _privacy_like_a_site(plan: SimulationPlan) -> PrivacyState | None:
    """The privacy state a site's DP-SGD starts a round from (noise from its budget), or None."""
    if not plan.run.dp.sample_level:
        return None
    site = SiteConfig.simulated_site(
        {"partition-id": 0, "num-partitions": plan.num_sites, "state-dir": "/nonexistent"}, plan.run
    )
    data = simulated_site_data(plan.run.data, 0, plan.num_sites)
    return plan_round(
        plan.run, site, [], data.identity, run_id=1, server_round=1, num_examples=len(data.train), granted=site.epsilon
    ).total


def measure(scale: Scale, runs_dir: Path) -> dict[str, Any]:
    plan = plan_from_values({**scale.settings, "rounds": ROUNDS, "run-name": "scale"})
    floor_plan = replace(plan, run=replace(plan.run, dp=replace(plan.run.dp, enabled=False)))
    sampled = sample_size(plan.run.aggregation, plan.num_sites)
    floor = simulate(floor_plan, runs_dir / "floor", FLOOR_CLIENTAPP)
    cohort = simulate(plan, runs_dir / "cohort", None)
    compute = training_compute_ms(plan)
    floor_ms = floor["seconds_per_round"] / sampled * 1000
    cohort_ms = cohort["seconds_per_round"] / sampled * 1000
    return {
        "scale": scale.name,
        "sites": plan.num_sites,
        "sampled_per_round": sampled,
        "cohort": cohort,
        "floor": floor,
        "cohort_ms_per_site_round": round(cohort_ms, 1),
        "floor_ms_per_site_round": round(floor_ms, 1),
        "training_compute_ms": round(compute, 1),
        "cohort_over_floor_beyond_compute": round((cohort_ms - compute) / floor_ms, 2),
        "goal_met": cohort_ms <= 3 * floor_ms + compute,
    }


def run(runs_dir: Path) -> list[dict[str, Any]]:
    return [measure(scale, runs_dir / f"{scale.settings['num-sites']}-{index}") for index, scale in enumerate(SCALES)]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| federation | sampled per round | s per round (Cohort / floor) | ms per site-round (Cohort / floor) | "
            "training compute ms | (Cohort - compute) / floor | start-up s (Cohort / floor) | "
            "peak memory GB (Cohort / floor) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c, f = r["cohort"], r["floor"]
        lines.append(
            f"| {r['scale']} | {r['sampled_per_round']} | "
            f"{c['seconds_per_round']:.2f} / {f['seconds_per_round']:.2f} | "
            f"{r['cohort_ms_per_site_round']:.1f} / {r['floor_ms_per_site_round']:.1f} | "
            f"{r['training_compute_ms']:.1f} | {r['cohort_over_floor_beyond_compute']:.2f} | "
            f"{c['startup_seconds']:.1f} / {f['startup_seconds']:.1f} | "
            f"{c['peak_memory_gb']:.2f} / {f['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_table("scale", run, markdown)
