"""Starting Flower's SuperLink and SuperNodes for a real deployment.

Each command first checks what Flower would otherwise reject late and opaquely (an
expired or foreign certificate, a key readable by others, a host the certificate does
not cover, a port already taken, a site without its own budget) and says which file is
wrong and how to fix it. `cohort supernode` then runs Flower's SuperNode as its child
(SIGTERM and Ctrl-C reach it, and it gets SIGTERM if `cohort supernode` dies), and says
in one line why it stopped when Flower's own log does not (an unregistered key); the
coordinator's side is two processes (the SuperLink on loopback and the front door,
deploy/front_door.py), which `cohort superlink` supervises together
(deploy/supervision.py).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from client.policy import pin_ledger_key, pinned_ledger_key
from common.config import validate_budget
from common.errors import CohortInputError
from common.privacy.ledger import PRIVATE_KEY_FILE, SiteLedger
from deploy.certificates import (
    LOOPBACK,
    LOOPBACK_NAME,
    CertificateLayout,
    check_ca,
    check_server_files,
    check_site_key,
    validate_site_name,
)
from deploy.clientapp_forkserver import wait_until_serving
from deploy.directory_lock import lock_state_dir
from deploy.flower_runtime import flower_executable, install_flower_launchers, offline_flower_env
from deploy.supervision import Program, Supervisor
from server.rundir import write_bytes_atomic

PROBE_TIMEOUT_S = 5.0
FLOWER_CONFIG_FILE = "config.toml"
# In a site's state directory: the folder put first on the PATH Flower starts ClientApps from.
SITE_RUNTIME_DIR = "runtime"
# The module that runs the site's own `flwr-clientapp`: its launcher, and the fork server
# each task is forked from (deploy/clientapp_forkserver.py).
CLIENTAPP_FORKSERVER_MODULE = "deploy.clientapp_forkserver"
# How long the fork server may take to import the site's ClientApp before it serves.
FORKSERVER_STARTUP_S = 300.0


@dataclass(frozen=True)
class SuperLinkLaunch:
    """certs: the directory of `cohort certs init`; database: where the SuperLink keeps
    registered SuperNodes and runs across restarts; host, port: where it listens, which
    serves every Flower API (Fleet, Control, Runtime): the coordinator's loopback behind
    the front door, or a private network that only the front door and the coordinator reach."""

    certs: Path
    database: Path
    host: str
    port: int

    def check(self) -> None:
        check_server_files(self.certs, (LOOPBACK, LOOPBACK_NAME))
        if not self.database.parent.is_dir():
            raise CohortInputError(
                f"--database {self.database}: folder {self.database.parent} "
                "does not exist; create it or choose another path"
            )
        require_free_port(self.host, self.port, "--local-port")

    @property
    def local_address(self) -> str:
        """Where `flwr` on this host reaches it (the certificate covers 127.0.0.1)."""
        return f"{LOOPBACK}:{self.port}"

    def argv(self, launchers: Path) -> list[str]:
        """launchers: the folder of Flower's launchers it runs through (install_flower_launchers)."""
        layout = CertificateLayout(self.certs)
        return [
            flower_executable("flower-superlink", launchers),
            "--ssl-ca-certfile", str(layout.ca_cert),
            "--ssl-certfile", str(layout.server_cert),
            "--ssl-keyfile", str(layout.server_key),
            "--enable-supernode-auth",
            "--database", str(self.database),
            "--host", self.host,
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip


@dataclass(frozen=True)
class SuperNodeLaunch:
    """One site's SuperNode: how it reaches the SuperLink and the site's own policy.

    superlink: HOST:PORT as the site dials it (the certificate must cover HOST).
    ca_cert: the federation's CA, the only issuer the site trusts.
    auth_key: the site's SuperNode key from `cohort certs site`.
    name, data, state_dir: the site's name, its data and where its ledger and key live.
    epsilon, delta: the site's total privacy budget for its data, over every run.
    port: the SuperNode's own local API, distinct per SuperNode on one machine.
    """

    superlink: str
    ca_cert: Path
    auth_key: Path
    name: str
    data: Path
    state_dir: Path
    epsilon: float
    delta: float
    port: int

    def check(self) -> None:
        validate_site_name(self.name)
        validate_budget(self.epsilon, self.delta, source=f"site {self.name}'s --epsilon/--delta")
        if not self.data.exists():
            raise CohortInputError(
                f"--data {self.data} does not exist; give the path of this site's data on this machine"
            )
        check_ca(self.ca_cert)
        check_site_key(self.auth_key)
        probe_superlink(self.superlink, self.ca_cert)

    def argv(self) -> list[str]:
        return [
            flower_executable("flower-supernode", self.runtime_dir),
            "--superlink", self.superlink,
            "--root-certificates", str(self.ca_cert),
            "--auth-supernode-private-key", str(self.auth_key),
            "--port", str(self.port),
            "--isolation", "subprocess",
            "--node-config", self.node_config(),
        ]  # fmt: skip

    @property
    def runtime_dir(self) -> Path:
        """The folder first on the SuperNode's PATH: the site's own `flwr-clientapp` and
        Flower's launchers."""
        return self.state_dir / SITE_RUNTIME_DIR

    def prepare(self) -> str:
        """The site's own runtime, once this process holds its state directory (for its
        life, which Flower's SuperNode's never outlasts): its ledger key (made on first start)
        and Flower's launchers. Returns the key's fingerprint, for the auditor's records."""
        lock_state_dir(self.state_dir)
        fingerprint = init_site_state(self.state_dir)
        install_flower_launchers(self.runtime_dir)
        return fingerprint

    def supervise(self) -> int:
        """Run the site's ClientApp fork server, then Flower's SuperNode, as this command's
        children until one stops, or SIGTERM or Ctrl-C stops them; returns the exit code,
        after one line saying why they stopped."""
        with tempfile.TemporaryDirectory(prefix="cohort-clientapps-") as folder:
            sockets = Path(folder)
            install_site_runner(self.state_dir, sockets)
            forkserver = Program(
                "the ClientApp fork server",
                forkserver_argv(sockets),
                ready=lambda process: self._forkserver_serves(sockets, process),
            )
            supernode = Program("flower-supernode", self.argv(), explain=self._stopped)
            return Supervisor(flower_env(self.runtime_dir)).run([forkserver, supernode])

    def _forkserver_serves(self, sockets: Path, process: subprocess.Popen[bytes]) -> None:
        if not wait_until_serving(sockets, lambda: process.poll() is None, FORKSERVER_STARTUP_S):
            raise CohortInputError(
                f"site {self.name}: the ClientApp fork server did not start (its log is above); "
                "check that Cohort is installed with `make setup`"
            )

    def _stopped(self, code: int) -> tuple[int, str]:
        """Flower 1.42's SuperNode stops itself with exit code 0 in one case only: the
        SuperLink answered its heartbeat 401 (flwr/supernode/fleet_http_connection.py,
        which then sends itself SIGINT and logs "terminated gracefully"). Exit 2 then, so
        that its service is not restarted into the same refusal."""
        if code == 0:
            return 2, (
                f"site {self.name}: the SuperLink no longer admits this SuperNode's key {self.auth_key.name}: "
                f"the coordinator unregistered the site (`cohort site unregister`), or this host's clock is off; "
                f"ask the coordinator to register the site's .pub again (`cohort site register`)"
            )
        exit_code = code if code > 0 else 128 - code
        return exit_code, f"site {self.name}: flower-supernode stopped (exit code {exit_code}); its log is above"

    def node_config(self) -> str:
        """Flower parses each value as TOML: strings quoted (JSON's quoting is valid TOML)."""
        values = {
            "site-name": self.name,
            "data-path": str(self.data.resolve()),
            "state-dir": str(self.state_dir.resolve()),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "coordinator": self.superlink,
        }
        return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def init_site_state(state_dir: Path) -> str:
    """The site's ledger key, signed ledger head and the key's pin in its policy.toml, made
    by the site's own command (never by a ClientApp): an existing key is kept (and must be
    the one the policy pins), and a ledger kept before heads existed, or before they were
    signed, gets a signed head once its chain verifies. Returns the key's fingerprint."""
    pinned = pinned_ledger_key(state_dir)
    if pinned is not None and not (state_dir / PRIVATE_KEY_FILE).exists():
        raise CohortInputError(
            f"{state_dir} has no ledger key {PRIVATE_KEY_FILE} but its policy pins {pinned}: "
            "restore the state directory from backup (docs/site.md, Backup and restore); "
            "no new key is made while the old one is pinned"
        )
    ledger = SiteLedger(state_dir, create_key=pinned is None, pinned_key=pinned)
    if pinned is None:
        pin_ledger_key(state_dir, ledger.fingerprint())
    elif ledger.fingerprint() != pinned:
        ledger.verified_entries()  # raises: names the replaced key and the fix
    ledger.adopt()
    return ledger.fingerprint()


def install_site_runner(state_dir: Path, sockets: Path) -> Path:
    """Write the site's `flwr-clientapp` into its state directory and return its folder.

    Flower's SuperExec starts ClientApps by the name `flwr-clientapp` from PATH; with this
    folder first on the SuperNode's PATH, every ClientApp process is the site's installed
    Cohort (client/site_runner.py), forked from the site's fork server listening in
    sockets, which runs isolated (-I: no PYTHONPATH, no user site, no working directory on
    sys.path), so no file a FAB or the environment brings is imported.
    """
    folder = state_dir / SITE_RUNTIME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    launcher = f"{shlex.quote(sys.executable)} -I -m {CLIENTAPP_FORKSERVER_MODULE} launch {shlex.quote(str(sockets))}"
    script.write_text(f'#!/bin/sh\nexec {launcher} "$@"\n', encoding="utf-8")
    script.chmod(0o755)
    return folder


def forkserver_argv(sockets: Path) -> list[str]:
    """The site's ClientApp fork server, listening in sockets (a folder only its user reads)."""
    return [sys.executable, "-I", "-m", CLIENTAPP_FORKSERVER_MODULE, "serve", str(sockets)]


def require_free_port(host: str, port: int, option: str) -> None:
    """Fail before anything starts, instead of one process of two failing to bind."""
    if not 0 < port < 65536:
        raise CohortInputError(f"{option} {port} is not a TCP port; give one from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise CohortInputError(
                f"cannot listen on {host}:{port} ({error.strerror}); stop what uses it or choose another {option}"
            ) from None


def wait_until_healthy(address: str, ca_cert: Path, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True once the SuperLink at address answers its health route over TLS; False if
    its process exits or the time runs out first."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"https://{address}/health", verify=context, timeout=1).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CohortInputError(f"--superlink {address!r} is not HOST:PORT; e.g. superlink.example.org:8000")
    return host, int(port)


def probe_superlink(address: str, ca_cert: Path) -> bool:
    """One TLS handshake with the SuperLink, trusting only the federation's CA.

    Turns what Flower would report as a bare SSL error, or as endless retries, into a
    sentence naming the file and the fix. Returns False when the SuperLink is not
    reachable yet (Flower retries then), True when the handshake succeeded.
    """
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as error:
        raise CohortInputError(_verification_advice(error, address, ca_cert)) from None
    except ssl.SSLError as error:
        raise CohortInputError(
            f"the SuperLink at {address} does not speak TLS ({error.reason}); "
            "it must run with TLS: start it with `cohort superlink`"
        ) from None
    except OSError:
        return False


def _verification_advice(error: ssl.SSLCertVerificationError, address: str, ca_cert: Path) -> str:
    host = split_address(address)[0]
    reason = error.verify_message
    if error.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return (
            f"the SuperLink's certificate does not cover {host} ({reason}); dial a name it covers, or have the "
            f"coordinator re-issue it with `cohort certs init DIR --superlink-host {host} --force`"
        )
    if error.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return (
            f"the SuperLink at {address} presents an expired certificate; the coordinator renews it with "
            "`cohort certs init DIR --force`"
        )
    return (
        f"the SuperLink at {address} presents a certificate that {ca_cert} does not trust ({reason}); "
        "use the ca.crt of the coordinator's `cohort certs init`"
    )


def flower_config(flwr_home: Path) -> dict[str, Any]:
    """Flower's config.toml (its SuperLink connections), or {} where there is none yet."""
    config_file = flwr_home / FLOWER_CONFIG_FILE
    try:
        return tomllib.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    except tomllib.TOMLDecodeError as error:
        raise CohortInputError(f"{config_file} is not valid TOML ({error}); fix or move it") from None


def write_connection(flwr_home: Path, name: str, superlink: str, ca_cert: Path) -> Path:
    """Add (or replace) a TLS connection in Flower's config.toml, keeping the others."""
    config_file = flwr_home / FLOWER_CONFIG_FILE
    config = flower_config(flwr_home)
    connections = config.setdefault("superlink", {})
    connections.setdefault("default", name)
    # Flower reads root-certificates relative to its working directory: store it absolute.
    connections[name] = {"address": superlink, "root-certificates": str(ca_cert.resolve())}
    flwr_home.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(config_file, tomli_w.dumps(config).encode())
    return config_file


def flwr_home() -> Path:
    """Flower's home: $FLWR_HOME, or ~/.flwr as Flower itself defaults."""
    return Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()


def flower_env(first_on_path: Path | None = None) -> dict[str, str]:
    """Flower's environment, with runtime dependency installation off (sites are often
    air-gapped) and Flower's executables found in `first_on_path` (a site's own runtime
    folder), then beside this interpreter."""
    return offline_flower_env(flwr_home(), first_on_path)
