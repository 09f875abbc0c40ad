"""Running Cohort's processes together and stopping exactly those.

`cohort superlink` runs two programs (Flower's SuperLink and the nginx front door), and
`cohort supernode` one (Flower's SuperNode, whose silent stops it explains); they
live and die together: when one stops, or the supervisor gets SIGTERM or SIGINT, every
process it started is stopped, with whatever each had started in turn. Each child also
gets SIGTERM from the kernel if the supervisor itself dies (Linux's PR_SET_PDEATHSIG), so
even a SIGKILL leaves nothing running.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

import psutil

from deploy.flower_runtime import die_with_parent

_POLL_S = 0.2
_GRACE_S = 10.0


@dataclass(frozen=True)
class Program:
    """name: how the operator's messages call it; argv: what runs; ready: returns once the
    started process serves (the next program starts only then), raises if it never will;
    explain: what a stop on its own with an exit code means, and the code to exit with."""

    name: str
    argv: list[str]
    ready: Callable[[subprocess.Popen[bytes]], None] | None = None
    explain: Callable[[int], tuple[int, str]] | None = None

    def stopped(self, code: int) -> tuple[int, str]:
        """The supervisor's exit code and one line, once the program stopped on its own."""
        if self.explain is not None:
            return self.explain(code)
        return (code if code > 0 else 1), f"{self.name} stopped (exit code {code}); stopping everything else"


@dataclass
class Supervisor:
    """Start programs one after another and keep them running until one stops or a stop is asked for."""

    env: dict[str, str]
    running: list[tuple[Program, subprocess.Popen[bytes]]] = field(default_factory=list)
    _stop_requested: bool = False

    def start(self, program: Program) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(program.argv, env=self.env, preexec_fn=die_with_parent)
        self.running.append((program, process))
        return process

    def exited(self) -> tuple[Program, int] | None:
        """The first program that has stopped, and its exit code."""
        for program, process in self.running:
            if process.poll() is not None:
                return program, process.returncode
        return None

    def run(self, programs: Sequence[Program]) -> int:
        """Start each program, once the one before is ready, and supervise them; returns
        the exit code for `cohort superlink`: 0 after a requested stop, else the code of
        the program that stopped on its own. Whatever happens, everything started is
        stopped before it returns or raises."""
        previous = {signum: signal.signal(signum, self._request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            for program in programs:
                if self._stop_requested:
                    return 0
                process = self.start(program)
                if program.ready is not None:
                    program.ready(process)
            while not self._stop_requested:
                stopped = self.exited()
                if stopped is not None and not self._stop_requested:  # Ctrl-C reaches the children too
                    program, code = stopped
                    exit_code, message = program.stopped(code)
                    print(f"error: {message}", file=sys.stderr, flush=True)
                    return exit_code
                time.sleep(_POLL_S)
            return 0
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self) -> None:
        """SIGTERM to every process started and to their descendants, newest first; SIGKILL
        to whatever is left after a grace period."""
        tree: list[psutil.Process] = []
        for _, process in reversed(self.running):
            try:
                root = psutil.Process(process.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for member in tree:
            _signal(member, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=_GRACE_S)
        for member in alive:
            _signal(member, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=_GRACE_S)
        for _, process in self.running:
            process.wait()
        self.running.clear()

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = True


def _signal(process: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(signum)
