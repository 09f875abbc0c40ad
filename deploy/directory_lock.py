"""One writer per directory: the process that writes a run directory or a site's state
directory holds its lock, and a second one is refused with one line naming the holder.

The lock is Linux's flock on a file in the directory: the kernel drops it when the last
process holding its descriptor ends, however it ends (SIGKILL included), so a crash never
leaves a directory locked, and a process that inherits the descriptor keeps it locked.

- A run directory (`run.lock`): `cohort simulate` and `cohort run` hold it until every
  process they started has stopped. Two commands on one run directory (a `--resume` of a
  run that is still going, or two commands given the same run-dir) would both append
  rounds, checkpoints and ledger copies to it. The guardian that stops a simulation's
  SuperLink inherits it and keeps the directory locked until it has finished stopping what
  still writes there.
- A site's state directory (`supernode.lock`): `cohort supernode` holds it across its exec
  into Flower's SuperNode, so exactly as long as the SuperNode lives. Two SuperNodes on
  one state directory would both sign releases into one ledger and race on its head, and
  Flower would only say "Failed to activate SuperNode" to the second. The file holds the
  holder's PID, for the refusal message and for an operator who looks.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import CohortInputError
from common.private_files import PRIVATE_FILE_MODE, private_dir

RUN_LOCK_FILE = "run.lock"
STATE_LOCK_FILE = "supernode.lock"


def lock_directory(lock_path: Path, holder: str, refusal: Callable[[str], str], mode: int) -> int:
    """Lock lock_path for this process and write holder into it; returns the lock's
    descriptor (close-on-exec: a child keeps it only when handed it). When another process
    holds it, raise with refusal(what that holder wrote)."""
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        current = os.read(descriptor, 4096).decode(errors="replace").strip()
        os.close(descriptor)
        raise CohortInputError(refusal(current)) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{holder}\n".encode())
    return descriptor


@contextmanager
def run_directory_lock(run_dir: Path, command: str) -> Iterator[int]:
    """Create run_dir if needed and hold its lock while the block runs; yields the lock's
    descriptor, for a child process that must keep the directory locked after this process
    is gone. command: the command holding it, as the refusal names it to a second writer."""
    private_dir(run_dir)
    holder = f"{command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    descriptor = lock_directory(
        run_dir / RUN_LOCK_FILE,
        holder,
        lambda current: (
            f"run directory {run_dir} is in use by {current or 'another command'}; wait for it to end or stop it"
        ),
        PRIVATE_FILE_MODE,
    )
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def lock_state_dir(state_dir: Path) -> int:
    """Lock the state directory for this process and whatever it execs into; returns the
    lock's descriptor, which stays open (and inheritable) for the process's life."""
    private_dir(state_dir)
    path = state_dir / STATE_LOCK_FILE
    descriptor = lock_directory(
        path,
        str(os.getpid()),
        lambda current: (
            f"--state-dir {state_dir} is in use by another SuperNode (PID {current or 'unknown'}, {path}); "
            "stop it first, or give this one its own state directory"
        ),
        PRIVATE_FILE_MODE,
    )
    os.set_inheritable(descriptor, True)
    return descriptor
