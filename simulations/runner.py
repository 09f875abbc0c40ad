"""Run a simulation plan on Flower's simulation engine through a private SuperLink.

The run itself is stock Flower: `flwr run <app> <connection>` against a SuperLink started
with --simulation. This module only checks the input first, locks the run directory,
starts and stops that SuperLink, and follows the run directory while the run goes on.
However the command ends (the run finishing or failing, an error here, Ctrl-C, SIGTERM or
SIGHUP), the SuperLink and every process under it are stopped before it returns; if the
command is killed outright, its children die with it (the kernel's parent-death signal)
and the SuperLink's guardian stops the rest (simulations/guardian.py).

A plan with an attack submits a copy of the app whose ClientApp is simulations.attacks:app
(the honest ClientApp, bent at the hostile sites), one with canary clients
simulations.canary_clients:app (bent at the canary clients), and a benchmark may submit another
ClientApp the same way (benchmarks/flower_floor.py); the source tree is never changed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import tomli_w
from flwr.app import ArrayRecord

from common.models.registry import build_model
from common.private_files import open_private
from common.secure_aggregation.model_vector import dimension
from deploy.directory_lock import run_directory_lock
from deploy.flower_runtime import (
    HONEST_CLIENTAPP,
    app_folder,
    die_with_parent,
    flower_executable,
    install_flower_launchers,
    offline_flower_env,
)
from deploy.run_follower import RoundCallback, follow_run
from server.checkpoint import latest_checkpoint
from server.held_out import federated_split, gradient_canaries
from server.pretraining import check_public_dataset
from server.records import Summary
from server.rundir import RunDirectory, write_json_atomic
from server.secure_aggregation_plan import run_parameters
from server.strategies import sample_size
from simulations.data_poisoning import poison_site_files
from simulations.federation import simulated_partitions, write_site_files
from simulations.local_superlink import LocalSuperLink
from simulations.plan import PLAN_FILE, SimulationPlan
from simulations.ray_cluster import require_reachable

HOSTILE_CLIENTAPP = "simulations.attacks:app"
CANARY_CLIENTAPP = "simulations.canary_clients:app"
CONNECTION = "cohort-local"
# Signals that end `cohort simulate` from outside (timeout, systemd, docker stop, a closed
# terminal); SIGINT (Ctrl-C) already arrives as KeyboardInterrupt.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class SimulationStopped(Exception):
    """The command was told to stop by a signal; every process it started is gone."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass(frozen=True)
class SimulationOutcome:
    run_dir: RunDirectory
    succeeded: bool
    summary: Summary | None
    log_file: Path


def check_plan(plan: SimulationPlan) -> None:
    """Fail fast, before any process starts, on input the run would trip over later."""
    split = federated_split(plan.run.data)
    simulated_partitions(plan.run.data, plan.num_sites)  # kept: write_site_files shares them out
    model = build_model(plan.run.training.model, split.input_shape, split.num_classes)
    check_public_dataset(plan.run)
    require_reachable(plan.ray_address)
    if plan.run.dp.secure_aggregation:
        run_parameters(
            plan.run, sample_size(plan.run.aggregation, plan.num_sites), dimension(ArrayRecord(model.state_dict()))
        )


def new_run(plan: SimulationPlan, runs_root: Path, federation_home: Path | None = None) -> SimulationPlan:
    """The plan with its run directory fixed, so this process knows where to look.

    The simulated sites keep their state (ledgers, keys, policies) in `federation_home`,
    by default a folder of the run's own; sites given a shared one spend from the same
    budgets in every simulation that uses it.
    """
    run_dir = RunDirectory.for_new_run(plan.run, root=runs_root)
    home = federation_home.resolve() if federation_home else run_dir.path / "federation"
    return replace(plan, run=replace(plan.run, run_dir=str(run_dir.path), federation_home=str(home)))


def resumed_run(run_dir: Path, plan_of: Callable[[Path], SimulationPlan]) -> SimulationPlan:
    plan = plan_of(run_dir)
    return replace(plan, run=replace(plan.run, run_dir=str(run_dir.resolve()), resume_from=str(run_dir.resolve())))


def run_simulation(
    plan: SimulationPlan,
    on_round: RoundCallback,
    on_start: Callable[[RunDirectory], None] = lambda _: None,
    clientapp: str | None = None,
) -> SimulationOutcome:
    """clientapp: the ClientApp component ('module:attribute') the sites run; by default the
    honest one, or the hostile one when the plan names an attack."""
    check_plan(plan)
    run_dir = RunDirectory(Path(plan.run.run_dir))
    log_file = run_dir.path / "flower.log"
    with run_directory_lock(run_dir.path, "cohort simulate") as lock, _stopped_by_signals():
        if plan.run.resume_from:  # checked once no other run can be writing it
            latest_checkpoint(run_dir.checkpoint_dir, plan.run.fingerprint())
            run_dir.reopen()
        write_json_atomic(run_dir.path / PLAN_FILE, plan.to_json())
        write_site_files(plan.run.data, plan.num_sites, run_dir.path, gradient_canaries(plan.run))
        if plan.attack is not None:
            poison_site_files(plan.attack, run_dir.path)
        on_start(run_dir)
        _run_on_local_superlink(plan, run_dir, log_file, lock, on_round, clientapp)
    summary = run_dir.read_summary()
    return SimulationOutcome(
        run_dir=run_dir, succeeded=summary is not None and not summary.stop_reason, summary=summary, log_file=log_file
    )


def _run_on_local_superlink(
    plan: SimulationPlan,
    run_dir: RunDirectory,
    log_file: Path,
    lock: int,
    on_round: RoundCallback,
    clientapp: str | None,
) -> None:
    """Submit the plan with stock `flwr run` to a private SuperLink and follow it to its end.
    lock: the run directory's lock, which the SuperLink's guardian keeps until it has stopped."""
    with tempfile.TemporaryDirectory(prefix="cohort-flwr-home-") as home:
        flwr_home = Path(home)
        component = clientapp or _clientapp_of(plan)
        app_dir = app_folder(flwr_home / "app", component)
        launchers = install_flower_launchers(flwr_home / "bin")
        with LocalSuperLink(
            flwr_home, run_dir.path / "superlink.log", launchers, keep_open=(lock,), ray_address=plan.ray_address
        ) as superlink:
            _write_connection(flwr_home, superlink.address)
            overrides = flwr_home / "run-config.toml"
            overrides.write_text(tomli_w.dumps(plan.run.to_flower()), encoding="utf-8")
            command = [
                flower_executable("flwr", launchers),
                "run",
                str(app_dir),
                CONNECTION,
                "--run-config",
                str(overrides),
                "--federation-config",
                plan.federation_config(),
                "--stream",
            ]
            with open_private(log_file, "ab") as log:
                process = subprocess.Popen(
                    command,
                    env=offline_flower_env(flwr_home, launchers),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
                try:
                    follow_run(process, run_dir, on_round)
                finally:
                    if process.poll() is None:
                        process.terminate()
                        process.wait()


def _clientapp_of(plan: SimulationPlan) -> str:
    """The honest ClientApp, or the one that bends it at the plan's hostile sites or canary clients."""
    if plan.attack is not None:
        return HOSTILE_CLIENTAPP
    return CANARY_CLIENTAPP if plan.run.data.audit_canary_clients else HONEST_CLIENTAPP


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SimulationStopped while the run goes on, so the
    `with` blocks unwind and stop what they started (the default action would kill this
    process at once and leave the SuperLink, Ray and the sites running)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SimulationStopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _write_connection(flwr_home: Path, address: str) -> None:
    config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
