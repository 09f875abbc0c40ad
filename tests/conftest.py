"""Shared fixtures: small real datasets written to disk, and a guard that every test
leaves no Flower or Ray process of its own behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from flwr.supercore.task_identity import TaskIdentity

from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger

# The commands under test wrap at $COLUMNS; the tests that check a width set it
# themselves, and the runner's own (pytest-xdist sets 80 in its workers) must not leak in.
os.environ.pop("COLUMNS", None)

# Tests press Ctrl-C on the commands they start. A shell that runs the suite in the
# background starts it with SIGINT ignored, which its children would inherit and Python
# would honour (no KeyboardInterrupt): the commands must see the terminal's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The files that take longest, longest first (their time in `--durations`, measured on
# the two-core CI machine): `make test` hands each worker whole files in this order
# (`--dist loadfile --no-loadscope-reorder`), so the long ones start at once and the short
# files fill the workers' ends. test_budget_property.py draws its examples afresh every run
# and its time varies with them, so it goes early, where either worker's end absorbs it.
LONGEST_FILES = (
    "test_deployment.py",
    "test_faults.py",
    "test_simulation.py",
    "test_fairness.py",
    "test_empirical_audit.py",
    "test_site_code.py",
    "test_deploy_launch.py",
    "test_client_level_dp.py",
    "test_budget_property.py",
    "test_audit_catches_bugs.py",
    "test_ledger_rollback.py",
    "test_terminal_output.py",
    "test_secure_aggregation_app.py",
    "test_models.py",
    "test_audit.py",
    "test_privacy_accounting.py",
    "test_noise_source.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Files that share a session fixture's federation (the twin runs below): `--dist loadfile`
# sends them to one worker as one unit, so the federation runs once, not once a worker.
SHARED_FEDERATIONS = {"test_fairness.py": "twin runs", "test_empirical_audit.py": "twin runs"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFederationScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SHARED_FEDERATIONS.get(Path(file).name, file)

    return SharedFederationScheduling(config, log)


_FEDERATION_PROCESS_MARKERS = (
    "flower-superlink",
    "flower-superexec",
    "flwr-simulation",
    "flwr-serverapp",
    "flwr-clientapp",
    "clientapp_forkserver",
    "raylet",
    "gcs_server",
    "ray::",
)


# Every process this test session starts inherits the marker, Ray's workers included;
# another checkout's tests on the same machine carry their own.
_SESSION_MARKER = "COHORT_TEST_SESSION"
os.environ[_SESSION_MARKER] = str(os.getpid())


def federation_processes() -> set[int]:
    """PIDs of Flower and Ray processes that this test session started, running now."""
    pids = set()
    for process in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(marker in text for marker in _FEDERATION_PROCESS_MARKERS) and _started_by_this_session(process):
            pids.add(process.info["pid"])
    return pids


def _started_by_this_session(process: psutil.Process) -> bool:
    try:
        return process.environ().get(_SESSION_MARKER) == os.environ[_SESSION_MARKER]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


@pytest.fixture
def no_leftover_processes():
    """Fails the test if a Flower or Ray process it started is still alive afterwards."""
    before = federation_processes()
    yield
    leftover = {pid for pid in federation_processes() - before if psutil.pid_exists(pid)}
    assert not leftover, (
        f"processes left running: {[psutil.Process(p).cmdline() for p in leftover if psutil.pid_exists(p)]}"
    )


@contextlib.contextmanager
def flower_task_identity() -> Iterator[None]:
    """What Flower's ClientApp runtime sets before the app makes its first Message."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def clientapp_identity() -> Iterator[None]:
    with flower_task_identity():
        yield


def make_images(count: int, size: int = 8, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent uint8 images: a bright square whose position encodes the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=count)
    images = rng.integers(0, 40, size=(count, size, size), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        row = (label * 2) % (size - 2)
        image[row : row + 2, 1:3] = 250
    return images, labels


@pytest.fixture
def medmnist_npz(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.npz"
    train_x, train_y = make_images(120, seed=1)
    val_x, val_y = make_images(20, seed=2)
    test_x, test_y = make_images(40, seed=3)
    np.savez(
        path,
        train_images=train_x,
        train_labels=train_y[:, None],
        val_images=val_x,
        val_labels=val_y[:, None],
        test_images=test_x,
        test_labels=test_y[:, None],
    )
    return path


COHORT = str(Path(sys.executable).parent / "cohort")


def _simulate_twin(runs: Path, *settings: str) -> Path:
    command = [
        COHORT,
        "simulate",
        "--set",
        "audit-canaries=150",
        "--set",
        "num-sites=3",
        *settings,
        "--runs-dir",
        str(runs),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "80"}, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = list(runs.iterdir())
    return run_dir


@pytest.fixture(scope="session")
def non_private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twin runs on the same data, sites and canaries, without DP and with it. Without
    DP, several local epochs: the canary site memorises its canaries' wrong labels."""
    return _simulate_twin(
        tmp_path_factory.mktemp("no-dp"), "simulations/no-dp.toml", "--set", "rounds=5", "--set", "local-epochs=6"
    )


@pytest.fixture(scope="session")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate_twin(tmp_path_factory.mktemp("dp"), "--set", "rounds=3")


@pytest.fixture
def site_npz(tmp_path: Path) -> Path:
    """A deployed site's own data file: 100 small images of three classes."""
    images, labels = make_images(100, seed=5)
    path = tmp_path / "site.npz"
    np.savez(path, train_images=images, train_labels=labels[:, None])
    return path


def ledger_release(round_: int) -> LedgerRecord:
    """A DP release of run 1 as a site's ledger records it (the figures are not checked)."""
    return LedgerRecord(
        kind=RecordKind.RELEASE, run_id=1, round=round_, site="site", mechanism="", noise_multiplier=1.0,
        sample_rate=0.1, sampling="poisson", steps=10, clip_norm=1.0, delta=1e-5, epsilon=0.5, accountant="rdp",
        budget_epsilon=8.0, dataset_hash="d", model_hash="", config_hash="",
    )  # fmt: skip


@pytest.fixture
def site_state(tmp_path: Path) -> Path:
    """A site's state directory made by `cohort site init` (its key pinned), after two releases."""
    from deploy.launch import init_site_state

    state = tmp_path / "state"
    init_site_state(state)
    ledger = SiteLedger(state)
    ledger.append(ledger_release(1))
    ledger.append(ledger_release(2))
    return state


def cohort(*args: str) -> subprocess.CompletedProcess[str]:
    """`cohort ARGS...` from this checkout, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        check=False,
    )
