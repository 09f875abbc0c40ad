"""`cohort superlink`, `cohort front-door`, `cohort supernode`, `cohort connect` and `cohort
run` check before anything starts: a deployment mistake gets one line naming the file and the fix,
and exit 2 with nothing left running, never a bare TLS error or a SuperNode retrying
forever. `cohort superlink` runs the SuperLink and the front door together and stops
both, whichever way it ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from flwr.common.config import parse_config_args

from deploy import commands
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from deploy.directory_lock import STATE_LOCK_FILE
from deploy.launch import SuperNodeLaunch
from server.run_config import RunConfig
from server.rundir import RunDirectory
from simulations.local_superlink import free_port, stop_process_tree

COHORT = str(Path(sys.executable).parent / "cohort")
PASSPHRASE = b"the coordinator's passphrase"
needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="Debian's nginx is not installed (make test installs it when run as root)"
)


def _cohort(command: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    assert command[0] == "cohort"
    return subprocess.run(
        [COHORT, *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLWR_HOME": str(home), **env},
        check=False,
    )


@pytest.fixture
def certs(tmp_path: Path) -> CertificateLayout:
    layout = CertificateLayout(tmp_path / "certs")
    init_certificates(layout.root, ["superlink.example"], passphrase=PASSPHRASE)
    create_site_key(layout.root, "hospital-a")
    return layout


def _superlink(certs_dir: Path, tmp_path: Path, port: int = 8000, local_port: int = 9093) -> list[str]:
    return commands.superlink_command(certs_dir, tmp_path / "superlink.db", "127.0.0.1", port, local_port)


def _supernode(certs: CertificateLayout, tmp_path: Path, superlink: str, epsilon: float = 8.0) -> list[str]:
    data = tmp_path / "site.npz"
    np.savez(data, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1)))
    return commands.supernode_command(
        superlink, certs.ca_cert, certs.site_key("hospital-a"), "hospital-a", data, tmp_path / "state", epsilon, 1e-5
    )


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


@pytest.fixture
def tls_server(certs: CertificateLayout) -> Iterator[int]:
    """A real TLS endpoint with the SuperLink's certificate (SANs: superlink.example, 127.0.0.1, localhost)."""
    yield from _serve_tls(certs, "127.0.0.1")


@pytest.fixture
def tls_server_on_another_loopback_address(certs: CertificateLayout) -> Iterator[int]:
    """The same, on 127.0.0.2: a loopback address the certificate does not cover."""
    yield from _serve_tls(certs, "127.0.0.2")


def _serve_tls(certs: CertificateLayout, host: str) -> Iterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    yield from _serve(lambda conn: context.wrap_socket(conn, server_side=True).close(), host)


@pytest.fixture
def plain_server() -> Iterator[int]:
    """A TCP endpoint that answers without TLS, as an --insecure SuperLink would."""
    yield from _serve(lambda conn: (conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), conn.close()))


def _serve(handle, host: str = "127.0.0.1") -> Iterator[int]:  # type: ignore[no-untyped-def]
    listener = socket.create_server((host, 0))
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
    init_certificates(
        tmp_path / "old",
        ["superlink.example"],
        passphrase=PASSPHRASE,
        days=1,
        issued_at=datetime.now(UTC) - timedelta(days=30),
    )
    result = _cohort(_superlink(tmp_path / "old", tmp_path), tmp_path)
    _assert_one_clear_line(result, "expired on", "--force")


def test_superlink_certificate_from_another_ca_is_named_as_a_mismatch(certs: CertificateLayout, tmp_path: Path) -> None:
    init_certificates(tmp_path / "other", ["superlink.example"], passphrase=PASSPHRASE)
    certs.ca_cert.write_bytes(CertificateLayout(tmp_path / "other").ca_cert.read_bytes())
    result = _cohort(_superlink(certs.root, tmp_path), tmp_path)
    _assert_one_clear_line(result, "superlink.crt was not signed by", str(certs.ca_cert))


def test_supernode_key_readable_by_others_is_refused_with_the_chmod_fix(
    certs: CertificateLayout, tmp_path: Path, tls_server: int
) -> None:
    certs.site_key("hospital-a").chmod(0o644)
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.1:{tls_server}"), tmp_path)
    _assert_one_clear_line(result, f"chmod 600 {certs.site_key('hospital-a')}")


def test_supernode_dialling_a_host_the_certificate_does_not_cover_is_told_so(
    certs: CertificateLayout, tmp_path: Path, tls_server_on_another_loopback_address: int
) -> None:
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.2:{tls_server_on_another_loopback_address}"), tmp_path)
    _assert_one_clear_line(result, "does not cover 127.0.0.2", "--superlink-host 127.0.0.2")


def test_supernode_facing_a_superlink_without_tls_is_told_so(
    certs: CertificateLayout, tmp_path: Path, plain_server: int
) -> None:
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.1:{plain_server}"), tmp_path)
    _assert_one_clear_line(result, "does not speak TLS")


def test_supernode_with_a_budget_of_zero_is_refused(certs: CertificateLayout, tmp_path: Path, tls_server: int) -> None:
    result = _cohort(_supernode(certs, tmp_path, f"127.0.0.1:{tls_server}", epsilon=0.0), tmp_path)
    _assert_one_clear_line(result, "is 0.0; it must be a finite number in (0, 1000]")


@pytest.mark.parametrize("size", ["0", "nan", "inf", "-5"])
def test_superlink_with_a_max_model_size_that_is_no_size_is_refused(
    certs: CertificateLayout, tmp_path: Path, size: str
) -> None:
    result = _cohort([*_superlink(certs.root, tmp_path, free_port(), free_port()), "--max-model-mb", size], tmp_path)
    _assert_one_clear_line(result, "--max-model-mb")
    assert not _processes_using(certs.root)


def test_supernode_address_without_a_port_is_refused(certs: CertificateLayout, tmp_path: Path) -> None:
    result = _cohort(_supernode(certs, tmp_path, "superlink.example"), tmp_path)
    _assert_one_clear_line(result, "is not HOST:PORT")


def test_connect_with_a_ca_that_did_not_sign_the_superlink_writes_nothing(
    certs: CertificateLayout, tmp_path: Path, tls_server: int
) -> None:
    init_certificates(tmp_path / "other", ["superlink.example"], passphrase=PASSPHRASE)
    command = commands.connect_command(
        "hospitals", f"127.0.0.1:{tls_server}", CertificateLayout(tmp_path / "other").ca_cert
    )
    result = _cohort(command, tmp_path / "home")
    _assert_one_clear_line(result, "does not trust")
    assert not (tmp_path / "home" / "config.toml").exists()


def test_connect_writes_the_tls_connection_into_flowers_config(
    certs: CertificateLayout, tmp_path: Path, tls_server: int
) -> None:
    result = _cohort(commands.connect_command("hospitals", f"127.0.0.1:{tls_server}", certs.ca_cert), tmp_path / "home")
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert config["superlink"]["default"] == "hospitals"
    assert config["superlink"]["hospitals"] == {
        "address": f"127.0.0.1:{tls_server}",
        "root-certificates": str(certs.ca_cert.resolve()),
    }


def test_run_with_a_misspelt_setting_names_the_closest_one_and_submits_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [COHORT, *commands.cohort_run_command("hospitals", ["round=1", "min-sites=2"])[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "home")},
        check=False,
    )
    _assert_one_clear_line(result, "unknown setting 'round'; did you mean 'rounds'?")
    assert list(tmp_path.iterdir()) == [], "nothing may be written before the settings are valid"


def test_run_without_the_connection_says_how_to_make_it(tmp_path: Path) -> None:
    result = _cohort(commands.cohort_run_command("hospitals", ["rounds=1"]), tmp_path / "home")
    _assert_one_clear_line(result, "no connection 'hospitals'", "`cohort connect hospitals --superlink 127.0.0.1:9093")


def test_run_into_a_run_directory_that_holds_a_run_is_refused(tmp_path: Path) -> None:
    RunDirectory(tmp_path / "study-1").prepare(RunConfig())
    result = _cohort(commands.cohort_run_command("hospitals", [f"run-dir={tmp_path / 'study-1'}"]), tmp_path / "home")
    _assert_one_clear_line(
        result, f"run directory {tmp_path / 'study-1'} already holds a run", f"resume-from={tmp_path / 'study-1'}"
    )


def test_the_node_config_flower_parses_is_the_sites_own_policy(tmp_path: Path) -> None:
    launch = SuperNodeLaunch(
        "superlink.example:8000",
        tmp_path / "ca.crt",
        tmp_path / "k",
        "hospital-a",
        Path("/data/a b.npz"),
        Path("/var/lib/cohort"),
        3.0,
        1e-6,
        9094,
    )
    parsed = parse_config_args([launch.node_config()])
    assert parsed == {
        "site-name": "hospital-a",
        "data-path": "/data/a b.npz",
        "state-dir": "/var/lib/cohort",
        "epsilon": 3.0,
        "delta": 1e-6,
        "coordinator": "superlink.example:8000",
    }


# ---------------------------------------------------------------------- the coordinator's side


def _processes_using(path: Path) -> list[psutil.Process]:
    """Processes whose command line names a file under path: what a command started with it."""
    return [
        process
        for process in psutil.process_iter(["cmdline"])
        if any(str(path) in word for word in process.info["cmdline"] or [])
    ]


def _occupied_port() -> Iterator[socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


occupied = pytest.fixture(_occupied_port)


def test_superlink_without_nginx_on_the_path_says_how_to_install_it_and_starts_nothing(
    certs: CertificateLayout, tmp_path: Path
) -> None:
    bare_path = str(Path(sys.executable).parent)  # cohort and Flower, but no nginx
    result = _cohort(_superlink(certs.root, tmp_path, free_port(), free_port()), tmp_path, PATH=bare_path)
    _assert_one_clear_line(result, "nginx is not", "apt-get install nginx-light")
    assert not _processes_using(certs.root)


def test_superlink_whose_public_port_is_taken_names_it_and_starts_nothing(
    certs: CertificateLayout, tmp_path: Path, occupied: socket.socket
) -> None:
    port = occupied.getsockname()[1]
    result = _cohort(_superlink(certs.root, tmp_path, port, free_port()), tmp_path)
    _assert_one_clear_line(result, f"cannot listen on 127.0.0.1:{port}", "--port")
    assert not _processes_using(certs.root)


def test_superlink_whose_local_port_is_taken_names_it_and_starts_nothing(
    certs: CertificateLayout, tmp_path: Path, occupied: socket.socket
) -> None:
    port = occupied.getsockname()[1]
    result = _cohort(_superlink(certs.root, tmp_path, free_port(), port), tmp_path)
    _assert_one_clear_line(result, f"cannot listen on 127.0.0.1:{port}", "--local-port")
    assert not _processes_using(certs.root)


def test_superlink_behind_the_front_door_refuses_to_listen_beyond_loopback(
    certs: CertificateLayout, tmp_path: Path
) -> None:
    result = _cohort([*_superlink(certs.root, tmp_path, free_port(), free_port()), "--local-host", "0.0.0.0"], tmp_path)
    _assert_one_clear_line(result, "listens on 127.0.0.1 only")


def test_superlink_refuses_an_unencrypted_ca_key_beside_it(certs: CertificateLayout, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=PASSPHRASE)
    certs.ca_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    result = _cohort(_superlink(certs.root, tmp_path, free_port(), free_port()), tmp_path)
    _assert_one_clear_line(result, "ca.key is not encrypted")
    assert not _processes_using(certs.root)


@needs_nginx
def test_front_door_whose_configuration_nginx_refuses_quotes_nginx_and_starts_nothing(tmp_path: Path) -> None:
    """The SuperLink's name does not resolve: `nginx -t` refuses the upstream."""
    layout = CertificateLayout(tmp_path / "certs")
    init_certificates(layout.root, ["superlink.invalid"], passphrase=PASSPHRASE)
    command = [
        "cohort",
        "front-door",
        "--certs",
        str(layout.root),
        "--upstream",
        "superlink.invalid:9093",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    result = _cohort(command, tmp_path)
    _assert_one_clear_line(result, "nginx refused the front door's configuration", "superlink.invalid")
    assert not _processes_using(layout.root)


def _start_coordinator(
    certs: CertificateLayout, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], list[psutil.Process], int]:
    """`cohort superlink` serving: returns it, every process under it, and the front door's port."""
    port = free_port()
    log = (tmp_path / "superlink.log").open("wb")
    process = subprocess.Popen(
        [COHORT, *_superlink(certs.root, tmp_path, port, free_port())[1:]],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "home")},
    )
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "superlink.log").read_text()
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", verify=context, timeout=1).status_code == 403:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    tree = psutil.Process(process.pid).children(recursive=True)
    names = {p.name() for p in tree}
    assert "nginx" in names and any(name.startswith("flower-superlin") for name in names), names
    return process, tree, port


def _assert_all_gone(tree: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, alive


@pytest.fixture
def local_certs(tmp_path: Path) -> CertificateLayout:
    layout = CertificateLayout(tmp_path / "certs")
    init_certificates(layout.root, ["localhost"], passphrase=PASSPHRASE)
    return layout


@needs_nginx
def test_superlink_stops_the_superlink_and_the_front_door_on_sigterm(
    local_certs: CertificateLayout, tmp_path: Path
) -> None:
    process, tree, port = _start_coordinator(local_certs, tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    _assert_all_gone(tree)
    socket.create_server(("127.0.0.1", port)).close()  # the public port is free again


@needs_nginx
def test_superlink_stops_the_front_door_when_the_superlink_dies(local_certs: CertificateLayout, tmp_path: Path) -> None:
    process, tree, _ = _start_coordinator(local_certs, tmp_path)
    next(p for p in tree if p.name().startswith("flower-superlin")).kill()
    assert process.wait(timeout=30) != 0
    _assert_all_gone(tree)
    assert "flower-superlink stopped" in (tmp_path / "superlink.log").read_text()


@needs_nginx
def test_killing_the_supervisor_leaves_nothing_running(local_certs: CertificateLayout, tmp_path: Path) -> None:
    process, tree, _ = _start_coordinator(local_certs, tmp_path)
    process.kill()
    process.wait(timeout=10)
    _assert_all_gone(tree)


def _start_supernode(command: list[str], tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    """`cohort supernode` in the background; it runs Flower's SuperNode, which keeps
    retrying the TLS endpoint that closes every connection."""
    command = [*command[:-1], str(free_port())]  # each its own local API port
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [COHORT, *command[1:]],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FLWR_HOME": str(tmp_path / name)},
    )


def _wait_for_lock_holder(state_dir: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the SuperNode stopped"
        lock = state_dir / STATE_LOCK_FILE
        if (
            lock.exists()
            and lock.read_text().strip() == str(process.pid)
            and any(p.name().startswith("flower-superno") for p in psutil.Process(process.pid).children())
        ):
            return
        time.sleep(0.2)
    pytest.fail(f"no SuperNode with PID {process.pid} holds {state_dir}")


def test_a_second_supernode_on_a_state_directory_in_use_refuses_naming_the_holder(
    certs: CertificateLayout, tmp_path: Path, tls_server: int, no_leftover_processes: None
) -> None:
    command = _supernode(certs, tmp_path, f"127.0.0.1:{tls_server}")
    first = _start_supernode(command, tmp_path, "first")
    try:
        _wait_for_lock_holder(tmp_path / "state", first)
        second = _cohort([*command[:-1], str(free_port())], tmp_path)
    finally:
        stop_process_tree(first.pid)
        first.wait()
    _assert_one_clear_line(second, f"is in use by another SuperNode (PID {first.pid}")


def test_the_state_directory_lock_dies_with_a_killed_supernode(
    certs: CertificateLayout, tmp_path: Path, tls_server: int, no_leftover_processes: None
) -> None:
    command = _supernode(certs, tmp_path, f"127.0.0.1:{tls_server}")
    killed = _start_supernode(command, tmp_path, "killed")
    _wait_for_lock_holder(tmp_path / "state", killed)
    killed.kill()
    killed.wait()
    restarted = _start_supernode(command, tmp_path, "restarted")
    try:
        _wait_for_lock_holder(tmp_path / "state", restarted)
    finally:
        stop_process_tree(restarted.pid)
        restarted.wait()
