"""The deployment recipe: every command an operator runs, as argument lists.

One source for the hints `cohort certs` prints, docs/deploy.md, docker/compose.yml and
the integration test that runs the recipe for real (tests/test_deployment.py), so a
command or flag that appears in one appears in all. Words like <SUPERLINK_HOST> are
placeholders the operator replaces; they stay quoted in a shell line, so an unreplaced
one fails loudly instead of being read as a redirection.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

# The front door: what sites reach, the Fleet API alone (Flower's default SuperLink port,
# flwr.supercore.constant.SUPERLINK_UVICORN_DEFAULT_PORT, so sites dial what Flower's docs say).
SUPERLINK_LISTEN_HOST = "0.0.0.0"
SUPERLINK_PORT = 8000
# flower-superlink 1.42 serves its Fleet, Control and Runtime APIs on one port: this one, on
# the coordinator's loopback (Flower's former Control API port), for flwr and its SuperExec.
SUPERLINK_LOCAL_PORT = 9093
SUPERLINK_LOCAL_ADDRESS = f"127.0.0.1:{SUPERLINK_LOCAL_PORT}"
# A SuperNode's own local API; SuperNodes that share a machine each need their own.
SUPERNODE_PORT = 9094

SUPERLINK_HOST = "<SUPERLINK_HOST>"
SUPERLINK_ADDRESS = f"{SUPERLINK_HOST}:{SUPERLINK_PORT}"
SUPERLINK_DATABASE = "<SUPERLINK_DATABASE>"
SUPERLINK_UPSTREAM = f"<SUPERLINK_PRIVATE_HOST>:{SUPERLINK_LOCAL_PORT}"
CONNECTION = "<CONNECTION>"
CERTS_DIR = "<CERTS_DIR>"
CA_CERT = "<CA_CERT>"
SITE_KEY = "<SITE_KEY>"
SITE_NAME = "<SITE_NAME>"
DATA_PATH = "<DATA_PATH>"
STATE_DIR = "<STATE_DIR>"
EPSILON = "<EPSILON>"
DELTA = "<DELTA>"
APP_DIR = "<COHORT_SOURCE_DIR>"
RUN_CONFIG = "<RUN_CONFIG>"
RUN_SETTING = "<KEY>=<VALUE>"


def certs_init_command(certs_dir: str | Path = CERTS_DIR, hosts: Sequence[str] = (SUPERLINK_HOST,)) -> list[str]:
    """The coordinator's CA and SuperLink certificate, valid for every host sites dial."""
    return ["cohort", "certs", "init", str(certs_dir), *(word for host in hosts for word in ("--superlink-host", host))]


def certs_site_command(certs_dir: str | Path = CERTS_DIR, name: str = SITE_NAME) -> list[str]:
    """Run at the site: its SuperNode key pair; the private key stays there, only NAME.pub goes to the coordinator."""
    return ["cohort", "certs", "site", str(certs_dir), name]


def superlink_command(
    certs_dir: str | Path = CERTS_DIR,
    database: str | Path = SUPERLINK_DATABASE,
    host: str = SUPERLINK_LISTEN_HOST,
    port: int = SUPERLINK_PORT,
    local_port: int = SUPERLINK_LOCAL_PORT,
) -> list[str]:
    """The coordinator's side: the SuperLink on 127.0.0.1:local_port (TLS with the
    certificates of `cohort certs init`, only registered SuperNodes admitted, registrations
    kept in the database file) and the front door on host:port, the Fleet API alone."""
    return [
        "cohort", "superlink",
        "--certs", str(certs_dir),
        "--database", str(database),
        "--host", host,
        "--port", str(port),
        "--local-port", str(local_port),
    ]  # fmt: skip


def private_superlink_command(
    certs_dir: str | Path = CERTS_DIR,
    database: str | Path = SUPERLINK_DATABASE,
    local_host: str = SUPERLINK_LISTEN_HOST,
    local_port: int = SUPERLINK_LOCAL_PORT,
) -> list[str]:
    """The SuperLink alone, for a front door run elsewhere (docker/compose.yml): it listens
    on a private network that only the front door and the coordinator's tools reach."""
    return [
        "cohort", "superlink",
        "--certs", str(certs_dir),
        "--database", str(database),
        "--no-front-door",
        "--local-host", local_host,
        "--local-port", str(local_port),
    ]  # fmt: skip


def front_door_command(
    certs_dir: str | Path = CERTS_DIR,
    upstream: str = SUPERLINK_UPSTREAM,
    host: str = SUPERLINK_LISTEN_HOST,
    port: int = SUPERLINK_PORT,
) -> list[str]:
    """The front door alone, for that private SuperLink: sites get the Fleet API and nothing else."""
    return [
        "cohort",
        "front-door",
        "--certs",
        str(certs_dir),
        "--upstream",
        upstream,
        "--host",
        host,
        "--port",
        str(port),
    ]


def connect_command(
    connection: str = CONNECTION, superlink: str = SUPERLINK_LOCAL_ADDRESS, ca_cert: str | Path = CA_CERT
) -> list[str]:
    """Tells `flwr` on the coordinator's host how to reach the SuperLink over TLS, on
    loopback: the front door refuses `flwr`."""
    return ["cohort", "connect", connection, "--superlink", superlink, "--ca-cert", str(ca_cert)]


def register_command(public_key: str | Path, name: str = SITE_NAME, connection: str = CONNECTION) -> list[str]:
    """What the coordinator runs on its own host, with the NAME.pub a site sent, so that
    the SuperLink admits that SuperNode and its replies speak for that name alone."""
    return ["cohort", "site", "register", name, connection, "--key", str(public_key)]


def unregister_command(name: str = SITE_NAME, connection: str = CONNECTION) -> list[str]:
    """The coordinator removes a site by name: the SuperLink refuses its SuperNode from then on."""
    return ["cohort", "site", "unregister", name, connection]


def supernode_command(
    superlink: str = SUPERLINK_ADDRESS,
    ca_cert: str | Path = CA_CERT,
    auth_key: str | Path = SITE_KEY,
    name: str = SITE_NAME,
    data: str | Path = DATA_PATH,
    state_dir: str | Path = STATE_DIR,
    epsilon: str | float = EPSILON,
    delta: str | float = DELTA,
    port: int = SUPERNODE_PORT,
) -> list[str]:
    """What a site's operator runs: its data, its state and its own privacy budget, which
    the coordinator's run config cannot override (client/policy.py)."""
    return [
        "cohort", "supernode",
        "--superlink", superlink,
        "--ca-cert", str(ca_cert),
        "--auth-key", str(auth_key),
        "--name", name,
        "--data", str(data),
        "--state-dir", str(state_dir),
        "--epsilon", str(epsilon),
        "--delta", str(delta),
        "--port", str(port),
    ]  # fmt: skip


def run_command(app_dir: str | Path = APP_DIR, connection: str = CONNECTION, run_config: str = RUN_CONFIG) -> list[str]:
    """The coordinator submits the Cohort app with stock Flower."""
    return ["flwr", "run", str(app_dir), connection, "--run-config", run_config, "--stream"]


def cohort_run_command(connection: str = CONNECTION, settings: Sequence[str] = (RUN_SETTING,)) -> list[str]:
    """The coordinator submits a study with Cohort: its settings checked first, one line a
    round, and an exit code that says whether the run completed (deploy/submission.py)."""
    return ["cohort", "run", connection, *(word for setting in settings for word in ("--set", setting))]


def shell_line(command: Sequence[str]) -> str:
    """A command quoted for a POSIX shell, one option per line, so that it pastes as is."""
    lines: list[str] = []
    for word in command:
        if word.startswith("--") or not lines:
            lines.append(shlex.quote(word))
        else:
            lines[-1] += " " + shlex.quote(word)
    return " \\\n    ".join(lines)
