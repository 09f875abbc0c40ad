"""How Cohort starts Flower's own executables, in simulation and in deployment alike."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
from pathlib import Path

from common.errors import CohortInputError

# The Cohort source tree: the Flower App that `flwr run` packs and submits.
APP_DIR = Path(__file__).resolve().parents[1]


def offline_flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: isolated home, nothing fetched or reported at
    run time (Flower's telemetry is on unless FLWR_TELEMETRY_ENABLED=0)."""
    env = dict(os.environ)
    # The SuperLink spawns flower-superexec and flwr-simulation by name: they must be
    # found in this interpreter's environment, also when it was not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def flower_executable(name: str) -> str:
    """Flower's console scripts from this interpreter's environment first."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise CohortInputError(f"'{name}' is not installed; run `make setup` (it installs flwr[simulation])")
    return found


_PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec only the call itself should run.
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Popen's preexec_fn: the kernel sends the child SIGTERM when the thread that started it
    dies, however it dies (Linux's PR_SET_PDEATHSIG), so a SIGKILL to a `cohort` command
    leaves none of its direct children running."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def require_app_dir() -> None:
    if not (APP_DIR / "pyproject.toml").exists():
        raise CohortInputError(f"the Cohort source tree is not at {APP_DIR}; install Cohort from a checkout with `make setup`")
