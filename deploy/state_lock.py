"""One SuperNode per site state directory.

Two SuperNodes on one state directory would both sign releases into one ledger and race
on its head, and Flower would only say "Failed to activate SuperNode" to the second. So
`cohort supernode` takes an advisory lock (flock) on `supernode.lock` in the state
directory before it writes anything there, and keeps it across its exec into Flower's
SuperNode: the lock belongs to the open file, whose descriptor the SuperNode inherits, so
it is held exactly as long as the SuperNode lives and the kernel drops it however the
process ends, SIGKILL included. The file holds the holder's PID, for the refusal message
and for an operator who looks.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from common.errors import CohortInputError

LOCK_FILE = "supernode.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Lock the state directory for this process and whatever it execs into; returns the
    lock's descriptor, which stays open (and inheritable) for the process's life. Refuses
    with one line naming the holder's PID when another process holds it."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise CohortInputError(
            f"--state-dir {state_dir} is in use by another SuperNode (PID {holder}, {path}); "
            "stop it first, or give this one its own state directory"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    os.set_inheritable(descriptor, True)
    return descriptor
