"""Files and folders Cohort creates are its user's alone: folders 0700, files 0600.

A site's state directory holds its signing key and the ledger of everything its data has
released; a run directory holds metrics, checkpoints and the sites' data files of a
simulation. Created with the process's umask (typically 022), each would be readable by
every account on the machine. What is meant to be shared says so where it is written (a
ledger's public key, a systemd unit). A folder or file that already exists keeps its mode:
it is the operator's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and each missing parent 0700; returns `path`."""
    for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    return path


def open_private(path: Path, mode: str) -> IO[Any]:
    """open(path, mode) for writing ('w', 'a', 'wb', 'ab'), creating the file 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    descriptor = os.open(path, flags, PRIVATE_FILE_MODE)
    return os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8")
