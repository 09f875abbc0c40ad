"""`cohort service` writes systemd units that systemd itself accepts, confines each
service as far as what runs in it allows, and refuses a path the confinement would hide."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.service_units import HIDDEN_DIRECTORIES

COHORT = Path(sys.executable).parent / "cohort"
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="Debian's systemd (systemd-analyze) is not installed (make test installs it when run as root)",
)
installed_where_a_service_can_run = pytest.mark.skipif(
    any(directory in COHORT.parents for directory in HIDDEN_DIRECTORIES),
    reason=f"{COHORT} is under a directory a confined service cannot see",
)
# systemd-analyze security rates exposure from 0 (fully confined) to 10, and takes its
# threshold in tenths: 2.0 is near what a service that keeps its network and runs PyTorch reaches.
EXPOSURE_THRESHOLD_TENTHS = 20


def _service(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COHORT), "service", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def _install_units(root: Path, superlink_port: int = 8000) -> list[Path]:
    """Both units, as an operator writes them into /etc/systemd/system, here under `root`."""
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    coordinator = _service(
        "superlink", str(units / "cohort-superlink.service"), "--user", "cohort-coordinator",
        "--certs", "/etc/cohort/certs", "--database", "/var/lib/cohort-superlink/superlink.db",
        "--runs-dir", "/var/lib/cohort-superlink/runs", "--port", str(superlink_port),
    )  # fmt: skip
    site = _service(
        "supernode", str(units / "cohort-hospital-a.service"), "--user", "cohort-hospital-a",
        "--superlink", "coordinator.example:8000", "--ca-cert", "/etc/cohort/ca.crt",
        "--auth-key", "/etc/cohort/hospital-a.key", "--name", "hospital-a", "--data", "/srv/data/hospital-a.npz",
        "--state-dir", "/var/lib/cohort-hospital-a", "--epsilon", "8", "--delta", "1e-5",
    )  # fmt: skip
    assert coordinator.returncode == 0 and site.returncode == 0, coordinator.stderr + site.stderr
    return sorted(units.iterdir())


@pytest.fixture(scope="module")
def installed_units(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _install_units(tmp_path_factory.mktemp("root"))


@needs_systemd_analyze
@installed_where_a_service_can_run
def test_systemd_analyze_verify_accepts_both_units_without_a_warning(installed_units: list[Path]) -> None:
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, installed_units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0 and not verified.stdout + verified.stderr, verified.stdout + verified.stderr


@needs_systemd_analyze
@installed_where_a_service_can_run
def test_each_unit_is_rated_little_exposed_by_systemd_analyze_security(installed_units: list[Path]) -> None:
    for unit in installed_units:
        rated = subprocess.run(
            [
                "systemd-analyze",
                "security",
                "--offline=true",
                f"--threshold={EXPOSURE_THRESHOLD_TENTHS}",
                "--no-pager",
                str(unit),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert rated.returncode == 0, rated.stdout + rated.stderr
        assert "Overall exposure level" in rated.stdout, rated.stdout


@installed_where_a_service_can_run
def test_a_coordinator_on_a_port_below_1024_keeps_only_the_capability_to_bind_it(tmp_path: Path) -> None:
    unit = next(
        u for u in _install_units(tmp_path, superlink_port=443) if u.name == "cohort-superlink.service"
    ).read_text()
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n" in unit


def test_a_site_whose_data_is_under_home_is_refused_with_one_line(tmp_path: Path) -> None:
    result = _service(
        "supernode", str(tmp_path / "site.service"), "--user", "cohort-site",
        "--superlink", "coordinator.example:8000", "--ca-cert", "/etc/cohort/ca.crt",
        "--auth-key", "/etc/cohort/site.key", "--name", "site", "--data", "/home/alice/site.npz",
        "--state-dir", "/var/lib/cohort-site",
        "--epsilon", "8", "--delta", "1e-5",
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "/home/alice/site.npz is under /home" in result.stderr
    assert not (tmp_path / "site.service").exists()


def test_pytorch_cannot_train_in_memory_denied_write_and_execute_so_the_units_allow_it() -> None:
    """PR_SET_MDWE is the kernel's MemoryDenyWriteExecute for one process: under it,
    PyTorch's CPU convolution (oneDNN, which generates code at run time) fails."""
    script = """
import ctypes, sys, torch
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(3)
torch.nn.Conv2d(1, 4, 3)(torch.zeros(2, 1, 8, 8))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
    assert result.returncode != 0 and "could not create a primitive" in result.stderr, result.stderr
