"""The process that stops a simulation's SuperLink, and everything under it, when the
command that started it stops, however it stops.

`cohort simulate` starts this guardian as its own child, in a session of its own (Ctrl-C
reaches only the command) and with the kernel's parent-death signal: a SIGKILL to the
command (the OOM killer, a batch scheduler's kill of its process group) still reaches the
guardian as SIGTERM. The SuperLink's descendants cannot be reached that way: the
SuperExec starts a session of its own and Ray's processes die only with the ServerApp's
process, which would first see its ClientApps die and record that round as failed. So
the guardian stops the whole tree as the command itself would (LocalSuperLink.stop:
frozen, the ServerApp killed first), then exits with the SuperLink's exit code.

    python -m simulations.guardian PARENT_PID FLOWER-SUPERLINK ARGS...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from deploy.flower_runtime import die_with_parent
from simulations.local_superlink import SERVERAPP_PROCESS, stop_process_tree

POLL_S = 0.2


def guard(parent_pid: int, command: list[str]) -> int:
    """Run command until it exits or a stop is asked for (SIGTERM, SIGINT, SIGHUP, or the
    parent already gone); returns the exit code to leave with."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    if os.getppid() != parent_pid:  # the parent died before the kernel could be told to signal us
        return 1
    # The SuperLink dies with the guardian too, should the guardian itself be killed.
    superlink = subprocess.Popen(command, preexec_fn=die_with_parent)
    while not stop.is_set() and superlink.poll() is None:
        stop.wait(POLL_S)
    if superlink.poll() is None:
        stop_process_tree(superlink.pid, kill_first=(SERVERAPP_PROCESS,))
    return superlink.wait()


def main() -> None:
    parent_pid, *command = sys.argv[1:]
    sys.exit(guard(int(parent_pid), command))


if __name__ == "__main__":
    main()
