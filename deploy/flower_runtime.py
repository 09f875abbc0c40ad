"""How Cohort starts Flower's own executables, in simulation and in deployment alike."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from common.errors import CohortInputError

# The Cohort source tree, which holds the Flower App (app_folder stages it for `flwr run`).
APP_DIR = Path(__file__).resolve().parents[1]
# The packages the ServerApp and the ClientApps import: what a FAB of Cohort holds.
APP_PACKAGES = ("common", "server", "client", "simulations")
HONEST_CLIENTAPP = "client.app:app"


# Flower's executables that Cohort starts, and those Flower starts by name from PATH.
FLOWER_EXECUTABLES = (
    "flwr",
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-simulation",
)
# How long one `flwr` command on the Control API may take to answer.
FLWR_TIMEOUT_S = 60.0
LAUNCHER = """#!{python}
# Flower's {name}, as Cohort starts it: log lines plain where no terminal reads them.
import sys
from common.flower_logs import readable_flower_logs
readable_flower_logs()
from {module} import {attribute}
sys.exit({attribute}())
"""


def offline_flower_env(flwr_home: Path, launchers: Path | None = None) -> dict[str, str]:
    """Environment for every Flower process: isolated home, nothing fetched or reported at
    run time (Flower's telemetry is on unless FLWR_TELEMETRY_ENABLED=0), and the folder of
    Flower's launchers (install_flower_launchers) first on PATH when given."""
    env = dict(os.environ)
    # The SuperLink spawns flower-superexec and flwr-simulation by name: they must be
    # found in this interpreter's environment, also when it was not activated.
    folders = [str(launchers)] if launchers is not None else []
    env["PATH"] = os.pathsep.join([*folders, str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        # Ray prints its workers' lines into the ServerApp's log, which is relayed as text.
        RAY_COLOR_PREFIX="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def install_flower_launchers(folder: Path) -> Path:
    """Write into folder a launcher for each of FLOWER_EXECUTABLES: Flower's own entry
    point, run after common/flower_logs.py has made its log lines plain where no terminal
    reads them. With folder first on PATH, the processes Flower starts by name (SuperExec,
    ServerApp, simulation) run through them too. Returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FLOWER_EXECUTABLES:
        (entry,) = entry_points(group="console_scripts", name=name)
        module, _, attribute = entry.value.partition(":")
        launcher = folder / name
        launcher.write_text(
            LAUNCHER.format(python=sys.executable, name=name, module=module, attribute=attribute), encoding="utf-8"
        )
        launcher.chmod(0o755)
    return folder


def flower_executable(name: str, launchers: Path | None = None) -> str:
    """Flower's console script: its launcher when a folder of them is given, else the one
    in this interpreter's environment first."""
    if launchers is not None:
        return str(launchers / name)
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
        raise CohortInputError(
            f"the Cohort source tree is not at {APP_DIR}; install Cohort from a checkout with `make setup`"
        )


def app_folder(target: Path, clientapp: str = HONEST_CLIENTAPP) -> Path:
    """The Flower App staged in target for `flwr run`: APP_PACKAGES (and clientapp's own
    package) and the pyproject, naming clientapp as the ClientApp. Returns target.

    `flwr run` walks every file under the folder it is given before it filters them, and
    a checkout holds its virtual environment (some 50,000 files: 6.5 s a submission here);
    a staged folder also ships exactly the app, never a stray file of the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in dict.fromkeys((*APP_PACKAGES, clientapp.split(".", 1)[0])):
        shutil.copytree(APP_DIR / package, target / package, ignore=ignore)
    pyproject = (APP_DIR / "pyproject.toml").read_text(encoding="utf-8")
    honest_line = f'clientapp = "{HONEST_CLIENTAPP}"'
    if honest_line not in pyproject:
        raise RuntimeError(f"pyproject.toml no longer names the ClientApp as {honest_line}")
    staged = pyproject.replace(honest_line, f'clientapp = "{clientapp}"')
    named = tomllib.loads(staged)["tool"]["flwr"]["app"]["components"]["clientapp"]
    if named != clientapp:
        raise RuntimeError(f"the staged pyproject.toml names ClientApp {named!r}, not {clientapp!r}")
    (target / "pyproject.toml").write_text(staged, encoding="utf-8")
    return target


def flwr_json(command: Sequence[str], connection: str, flwr_home: Path, options: Sequence[str] = ()) -> dict[str, Any]:
    """Flower's JSON answer to `flwr COMMAND CONNECTION OPTIONS --format json`, or one
    CohortInputError saying why there is none (no answer in time, an error, not JSON)."""
    what = f"`flwr {' '.join(command[:2])}` on {connection}"
    try:
        result = subprocess.run(
            [flower_executable("flwr"), *command, connection, *options, "--format", "json"],
            env=offline_flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=FLWR_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CohortInputError(
            f"{what} got no answer within {FLWR_TIMEOUT_S:.0f} s; is `cohort superlink` running?"
        ) from None
    try:
        answer: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": (result.stdout + result.stderr).strip()[-300:]}
    if not answer.get("success", True):
        raise CohortInputError(f"{what} failed: {' '.join(str(answer.get('error-message', '')).split())}")
    return answer
