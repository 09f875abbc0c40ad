"""A private Flower SuperLink for one simulation: free port, isolated Flower home, no
network use, and every process it spawned stopped when it closes, or when the command that
opened it dies (simulations/guardian.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import psutil

from common.private_files import open_private
from deploy.flower_runtime import die_with_parent, flower_executable, offline_flower_env
from simulations.ray_cluster import engine_environment

STARTUP_TIMEOUT_S = 60.0
# The process that runs the ServerApp (and so writes the run directory) in a simulation.
SERVERAPP_PROCESS = "flwr-simulation"
GUARDIAN_MODULE = "simulations.guardian"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalSuperLink:
    """`with LocalSuperLink(home, log, launchers) as link:` runs `flower-superlink
    --simulation` under its guardian, through Flower's launchers in that folder
    (install_flower_launchers). keep_open: file descriptors the guardian holds until
    everything under it has stopped (the run directory's lock). ray_address: the Ray
    cluster the simulation engine joins (simulations/ray_cluster.py); empty, its own."""

    def __init__(
        self,
        flwr_home: Path,
        log_file: Path,
        launchers: Path,
        keep_open: tuple[int, ...] = (),
        ray_address: str = "",
    ) -> None:
        self.flwr_home = flwr_home
        self.log_file = log_file
        self.launchers = launchers
        self.keep_open = keep_open
        self.ray_address = ray_address
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            GUARDIAN_MODULE,
            str(os.getpid()),
            flower_executable("flower-superlink", self.launchers),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        with open_private(self.log_file, "ab") as log:
            # Its own session: Ctrl-C in the terminal reaches only us, and we stop it.
            self.process = subprocess.Popen(
                command,
                env=engine_environment(offline_flower_env(self.flwr_home, self.launchers), self.ray_address),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
                pass_fds=self.keep_open,
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.process.returncode}; see {self.log_file}")
            try:
                if httpx.get(f"http://{self.address}/health", timeout=0.5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not become ready in {STARTUP_TIMEOUT_S:.0f}s; see {self.log_file}")

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (ServerApp, Ray, ClientApps): the
        guardian does it on SIGTERM, as it does when this process dies."""
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait()
        self.process = None


def stop_process_tree(pid: int, grace_s: float = 10.0, kill_first: tuple[str, ...] = ()) -> None:
    """Stop a process and every descendant, including ones that re-parent on the way.

    The ServerApp (in `flwr-simulation`, named in kill_first) is killed while the tree is
    frozen, before any other process is let go: were it let go too, it would see its
    ClientApps die around it, take every reply still due as a failure, and record and
    checkpoint a round that never ran (and write summary.json), so that a resumed run
    would skip that round. Killed frozen, it stops between two of its own steps, as in a
    crash, which its run directory is written to survive.

    The tree is frozen with SIGSTOP until no new descendant appears (Ray's raylet keeps
    forking workers, and orphans re-parent to init, out of reach), then terminated.
    Processes whose command line contains one of `kill_first` are killed (SIGKILL) while
    still frozen, so that they run no further step once the others start to stop.
    """
    frozen: dict[int, psutil.Process] = {}
    while True:
        found = _descendants_and_self(pid) + [c for p in list(frozen.values()) for c in _children(p)]
        new = [p for p in found if p.pid not in frozen]
        if not new:
            break
        for process in new:
            frozen[process.pid] = process
            _signal(process, signal.SIGSTOP)
    for process in frozen.values():
        if any(name in command_line(process) for name in kill_first):
            _signal(process, signal.SIGKILL)  # a pending SIGKILL lets no user code run again
    for process in frozen.values():
        _signal(process, signal.SIGTERM)
        _signal(process, signal.SIGCONT)
    _, alive = psutil.wait_procs(list(frozen.values()), timeout=grace_s)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)


def _descendants_and_self(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def command_line(process: psutil.Process) -> str:
    """The process's command line as one string; empty once it is gone or unreadable."""
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def _signal(process: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(signum)
