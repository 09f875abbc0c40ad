"""One writer per run directory: the command that runs a federation holds the directory's
lock until every process it started has stopped.

Two commands on one run directory (a `--resume` of a run that is still going, or two
commands given the same run-dir) would both append rounds, checkpoints and ledger copies
to it. The lock is Linux's flock on `run.lock`: the kernel drops it when the last process
holding it ends, however it ends, so a crashed run never leaves the directory locked, and
a process that inherits it (the guardian that stops a simulation's SuperLink) keeps the
directory locked until it has finished stopping what still writes there.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import CohortInputError

LOCK_FILE = "run.lock"


@contextmanager
def run_directory_lock(run_dir: Path, holder: str) -> Iterator[int]:
    """Create run_dir if needed and hold its lock while the block runs; yields the lock's
    file descriptor, for a child process that must keep the directory locked after this
    process is gone. holder: the command, as the refusal names it to a second writer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = os.read(fd, 4096).decode(errors="replace").strip() or "another command"
            raise CohortInputError(f"run directory {run_dir} is in use by {current}; wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        yield fd
    finally:
        os.close(fd)
