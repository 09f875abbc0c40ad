"""`cohort superlink`, `cohort supernode` and `cohort connect` check before Flower starts:
a deployment mistake gets one line naming the file and the fix, and exit 2, never a bare
TLS error or a SuperNode retrying forever."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from flwr.common.config import parse_config_args

from deploy import commands
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from deploy.launch import SuperNodeLaunch

COHORT = str(Path(sys.executable).parent / "cohort")


def _cohort(command: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    assert command[0] == "cohort"
    return subprocess.run([COHORT, *command[1:]], capture_output=True, text=True, timeout=60, env={**os.environ, "FLWR_HOME": str(home)})


@pytest.fixture
def certs(tmp_path: Path) -> CertificateLayout:
    layout = CertificateLayout(tmp_path / "certs")
    init_certificates(layout.root, ["superlink.example"])
    create_site_key(layout.root, "hospital-a")
    return layout


def _superlink(certs_dir: Path, tmp_path: Path) -> list[str]:
    return commands.superlink_command(certs_dir, tmp_path / "superlink.db", "127.0.0.1", 8000)


def _supernode(certs: CertificateLayout, tmp_path: Path, superlink: str, epsilon: float = 8.0) -> list[str]:
    data = tmp_path / "site.npz"
    np.savez(data, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1)))
    return commands.supernode_command(superlink, certs.ca_cert, certs.site_key("hospital-a"), "hospital-a", data, tmp_path / "state", epsilon, 1e-5)


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


@pytest.fixture
def tls_server(certs: CertificateLayout) -> Iterator[int]:
    """A real TLS endpoint with the SuperLink's certificate (SANs: superlink.example, 127.0.0.1)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    yield from _serve(lambda conn: context.wrap_socket(conn, server_side=True).close())


@pytest.fixture
def plain_server() -> Iterator[int]:
    """A TCP endpoint that answers without TLS, as an --insecure SuperLink would."""
    yield from _serve(lambda conn: (conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), conn.close()))


def _serve(handle) -> Iterator[int]:  # type: ignore[no-untyped-def]
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                handle(conn)
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_superlink_without_certificates_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _cohort(_superlink(tmp_path / "empty", tmp_path), tmp_path)
    _assert_one_clear_line(result, "ca.crt does not exist", "cohort certs init")


def test_superlink_with_an_expired_certificate_says_when_it_expired_and_how_to_renew(tmp_path: Path) -> None:
    init_certificates(tmp_path / "old", ["superlink.example"], days=1, issued_at=datetime.now(UTC) - timedelta(days=30))
    result = _cohort(_superlink(tmp_path / "old", tmp_path), tmp_path)
    _assert_one_clear_line(result, "expired on", "--force")


def test_superlink_certificate_from_another_ca_is_named_as_a_mismatch(certs: CertificateLayout, tmp_path: Path) -> None:
    init_certificates(tmp_path / "other", ["superlink.example"])
    certs.ca_cert.write_bytes(CertificateLayout(tmp_path / "other").ca_cert.read_bytes())
    result = _cohort(_superlink(certs.root, tmp_path), tmp_path)
    _assert_one_clear_line(result, "superlink.crt was not signed by", str(certs.ca_cert))


def test_supernode_key_readable_by_others_is_refused_with_the_chmod_fix(certs: CertificateLayout, tmp_path: Path, tls_server: int) -> None:
    certs.site_key("hospital-a").chmod(0o644)
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.1:{tls_server}"), tmp_path)
    _assert_one_clear_line(result, f"chmod 600 {certs.site_key('hospital-a')}")


def test_supernode_dialling_a_host_the_certificate_does_not_cover_is_told_so(certs: CertificateLayout, tmp_path: Path, tls_server: int) -> None:
    result = _cohort(_supernode(certs, tmp_path, f"localhost:{tls_server}"), tmp_path)
    _assert_one_clear_line(result, "does not cover localhost", "--superlink-host localhost")


def test_supernode_facing_a_superlink_without_tls_is_told_so(certs: CertificateLayout, tmp_path: Path, plain_server: int) -> None:
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.1:{plain_server}"), tmp_path)
    _assert_one_clear_line(result, "does not speak TLS")


def test_supernode_with_a_budget_of_zero_is_refused(certs: CertificateLayout, tmp_path: Path, tls_server: int) -> None:
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.1:{tls_server}", epsilon=0.0), tmp_path)
    _assert_one_clear_line(result, "a privacy budget must be > 0")


def test_supernode_address_without_a_port_is_refused(certs: CertificateLayout, tmp_path: Path) -> None:
    result = _cohort(_supernode(certs, tmp_path, "superlink.example"), tmp_path)
    _assert_one_clear_line(result, "is not HOST:PORT")


def test_connect_with_a_ca_that_did_not_sign_the_superlink_writes_nothing(certs: CertificateLayout, tmp_path: Path, tls_server: int) -> None:
    init_certificates(tmp_path / "other", ["superlink.example"])
    command = commands.connect_command("hospitals", f"127.0.0.1:{tls_server}", CertificateLayout(tmp_path / "other").ca_cert)
    result = _cohort(command, tmp_path / "home")
    _assert_one_clear_line(result, "does not trust")
    assert not (tmp_path / "home" / "config.toml").exists()


def test_connect_writes_the_tls_connection_into_flowers_config(certs: CertificateLayout, tmp_path: Path, tls_server: int) -> None:
    result = _cohort(commands.connect_command("hospitals", f"127.0.0.1:{tls_server}", certs.ca_cert), tmp_path / "home")
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert config["superlink"]["default"] == "hospitals"
    assert config["superlink"]["hospitals"] == {"address": f"127.0.0.1:{tls_server}", "root-certificates": str(certs.ca_cert.resolve())}


def test_the_node_config_flower_parses_is_the_sites_own_policy(tmp_path: Path) -> None:
    launch = SuperNodeLaunch("superlink.example:8000", tmp_path / "ca.crt", tmp_path / "k", "hospital-a", Path("/data/a b.npz"), Path("/var/lib/cohort"), 3.0, 1e-6, 9094)
    parsed = parse_config_args([launch.node_config()])
    assert parsed == {"site-name": "hospital-a", "data-path": "/data/a b.npz", "state-dir": "/var/lib/cohort", "epsilon": 3.0, "delta": 1e-6}
