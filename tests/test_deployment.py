"""A real deployment on 127.0.0.1: `cohort superlink` (a TLS SuperLink on loopback that
admits only registered SuperNodes, behind the nginx front door), three hospital
SuperNodes with their own data, budgets, state and key pairs made at the site, and a DP
run submitted with stock `flwr run` on the coordinator's loopback, in which a fourth
registered site claims to be hospital-b. A site that holds ca.crt and a registered key
reaches the Fleet API and nothing else. A later run kills one site's SuperNode mid-round
and starts it again. Every command comes from the
recipe in deploy/commands.py, the same one docker/compose.yml and docs/deploy.md use."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from base64 import b64encode
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from common.privacy.ledger import (
    LEDGER_FILE,
    LedgerEntry,
    LedgerRecord,
    load_public_key,
    read_entries,
    verify_chain,
    verify_signature,
)
from deploy import commands
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from deploy.directory_lock import STATE_LOCK_FILE
from deploy.fleet_limits import OBJECT_ROUTE, FleetLimits
from deploy.flower_runtime import app_folder, offline_flower_env
from deploy.front_door import REFUSAL, fleet_routes
from deploy.launch import CLIENTAPP_FORKSERVER_MODULE
from deploy.site_registration import site_book_path
from server.rundir import RunDirectory
from simulations.local_superlink import free_port, stop_process_tree
from tests.conftest import make_images

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="Debian's nginx is not installed (make test installs it when run as root)"
)
CONNECTION = "cohort-test"
SITE_CONNECTION = "front-door"
PASSPHRASE = b"the coordinator's passphrase"
SITES = {"hospital-a": 8.0, "hospital-b": 6.0, "hospital-c": 4.0}
ROUNDS = 2
STARTUP_TIMEOUT_S = 120.0
# The site killed mid-round, and how long the server waits for any exchange's replies:
# above a healthy site's slowest exchange on a loaded 2-core machine (60 s was not). The
# killed site's round ends sooner, when the SuperLink answers for it as unavailable
# (two missed heartbeats, at most 60 s).
KILLED_SITE = "hospital-c"
# The site whose state directory is restored from a backup taken before its first study.
RESTORED_SITE = "hospital-a"
_LOCK = shutil.ignore_patterns(STATE_LOCK_FILE)
REPLY_TIMEOUT_S = 120
# The killed site's study: a restarted SuperNode takes tens of seconds to come back on a
# loaded machine (a CI run saw it return after round 3's training message was sent, with
# rounds of 18 s), so the study leaves it four rounds to rejoin in.
KILLED_SITE_ROUNDS = 5
SECURE_RUN_TIMEOUT_S = 900
# The front door limits each client address; the sites all use 127.0.0.1, so the front
# door is told the four registered SuperNodes share it, and each test that plays an unauthenticated client
# on the network uses a loopback address of its own.
SITES_ADDRESS = "127.0.0.1"
# The impostor: a registered site that claims to be another (Deployment.impostor).
IMPOSTOR = "impostor"
# Every site the coordinator registered: the hospitals and the impostor.
REGISTERED = len(SITES) + 1
LIMITS = FleetLimits(sites_per_address=REGISTERED)
# How long an unregistered SuperNode may take to learn it and exit.
UNREGISTERED_EXIT_S = 90
MB = 1 << 20
# How much the SuperLink may grow while anyone pushes bulk bodies at the front door.
MEMORY_BOUND = 64 * MB


def _local(command: list[str]) -> list[str]:
    """The recipe's `cohort`/`flwr` from this environment."""
    return [str(BIN / command[0]), *command[1:]]


@dataclass
class Deployment:
    """port: the front door, which sites reach; local_port: the SuperLink on loopback."""

    root: Path
    port: int
    local_port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def certs(self) -> CertificateLayout:
        """The coordinator's directory: CA, SuperLink certificate, and sites' public keys only."""
        return CertificateLayout(self.root / "certs")

    def site_keys(self, site: str) -> CertificateLayout:
        """A site's own directory, where `cohort certs site` made its key pair."""
        return CertificateLayout(self.root / "sites" / site)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def app(self) -> Path:
        """The Cohort app as the coordinator submits it (deploy.flower_runtime.app_folder)."""
        return self.root / "app"

    @property
    def local_address(self) -> str:
        return f"127.0.0.1:{self.local_port}"

    @property
    def site_book(self) -> Path:
        """Where `cohort site register` keeps the sites by name; `flwr run` must be told it."""
        return site_book_path(self.home("coordinator"), CONNECTION)

    def home(self, role: str) -> Path:
        return self.root / "homes" / role

    def state(self, site: str) -> Path:
        return self.root / "state" / site

    def spawn(self, role: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Output goes to a file: a pipe held open by Flower's children would hang the test.
        A `cohort` command gets no FLWR_TELEMETRY_ENABLED (Flower's default is on): turning
        telemetry off is its own job."""
        log = (self.root / "logs" / f"{role}.log").open("ab")
        env = offline_flower_env(self.home(role))
        if command[0] == "cohort":
            del env["FLWR_TELEMETRY_ENABLED"]
        process = subprocess.Popen(_local(command), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        self.processes.append(process)
        return process

    def run(self, role: str, command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _local(command),
            env=offline_flower_env(self.home(role)),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )

    def log(self, role: str) -> str:
        return (self.root / "logs" / f"{role}.log").read_text(errors="replace")

    def flwr_json(self, *args: str) -> dict:
        result = self.run("coordinator", ["flwr", *args, CONNECTION, "--format", "json"])
        payload = json.loads(result.stdout)
        assert payload.get("success", True), payload
        return payload

    def started_processes(self) -> list[psutil.Process]:
        """Every process the deployment runs now: what the test started and all it started in turn."""
        found = []
        for process in self.processes:
            try:
                root = psutil.Process(process.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def supernode(self, site: str, key: Path) -> list[str]:
        return commands.supernode_command(
            superlink=self.address,
            ca_cert=self.certs.ca_cert,
            auth_key=key,
            name=site,
            data=self.root / "data" / f"{site}.npz",
            state_dir=self.state(site),
            epsilon=SITES.get(site, 8.0),
            delta=1e-5,
            port=free_port(),
        )

    def impostor(self) -> list[str]:
        """The registered site `impostor`: its own key, data and state, but `--name hospital-b`."""
        command = self.supernode(IMPOSTOR, self.site_keys(IMPOSTOR).site_key(IMPOSTOR))
        command[command.index("--name") + 1] = "hospital-b"
        return command

    def stop(self) -> None:
        for process in self.processes:
            stop_process_tree(process.pid)
            process.wait()


def _write_data(directory: Path) -> None:
    directory.mkdir(parents=True)
    for seed, name in enumerate([*SITES, "intruder", IMPOSTOR, "coordinator"]):
        images, labels = make_images(160, seed=seed + 10)
        np.savez(directory / f"{name}.npz", train_images=images, train_labels=labels[:, None])


def _wait_for_front_door(deployment: Deployment, process: subprocess.Popen[bytes]) -> None:
    """`cohort superlink` starts the front door once the SuperLink is healthy; the front
    door answers 403 to the health route, which it does not forward."""
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, deployment.log("superlink")
        try:
            if httpx.get(f"https://{deployment.address}/health", verify=context, timeout=1).status_code == 403:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail(f"the front door did not come up: {deployment.log('superlink')}")


def _wait_for_online(deployment: Deployment, count: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if sum(node["status"] == "online" for node in deployment.flwr_json("supernode", "list")["nodes"]) == count:
            return
        time.sleep(1)
    pytest.fail("the SuperNodes did not come online: " + " ".join(deployment.log(site) for site in SITES))


def _receive_public_key(deployment: Deployment, site: str) -> Path:
    """The one file that travels from a site to the coordinator."""
    received = deployment.certs.site_public_key(site)
    received.parent.mkdir(parents=True)
    shutil.copy(deployment.site_keys(site).site_public_key(site), received)
    return received


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("deployment"), free_port(), free_port())
    (deployment.root / "logs").mkdir()
    init_certificates(deployment.certs.root, ["localhost"], passphrase=PASSPHRASE)
    for site in [*SITES, "intruder", IMPOSTOR]:
        create_site_key(deployment.site_keys(site).root, site)
    _write_data(deployment.root / "data")
    app_folder(deployment.app)
    try:
        superlink_command = [
            *commands.superlink_command(
                deployment.certs.root,
                deployment.root / "superlink.db",
                "127.0.0.1",
                deployment.port,
                deployment.local_port,
            ),
            "--sites-per-address",
            str(LIMITS.sites_per_address),
        ]
        _wait_for_front_door(deployment, deployment.spawn("superlink", superlink_command))
        connect = deployment.run(
            "coordinator", commands.connect_command(CONNECTION, deployment.local_address, deployment.certs.ca_cert)
        )
        assert connect.returncode == 0, connect.stderr
        for site in [*SITES, IMPOSTOR]:
            registered = deployment.run(
                "coordinator", commands.register_command(_receive_public_key(deployment, site), site, CONNECTION)
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for site in SITES:
            deployment.spawn(site, deployment.supernode(site, deployment.site_keys(site).site_key(site)))
        deployment.spawn(IMPOSTOR, deployment.impostor())
        _wait_for_online(deployment, REGISTERED)
        # The backup a restore brings back later: the state `cohort supernode` initialised.
        shutil.copytree(deployment.state(RESTORED_SITE), deployment.root / "backup", ignore=_LOCK)
        # A site's own flwr, pointed at the address it reaches: the front door.
        site_connect = deployment.run(
            "hospital-a", commands.connect_command(SITE_CONNECTION, deployment.address, deployment.certs.ca_cert)
        )
        assert site_connect.returncode == 0, site_connect.stderr
        yield deployment
    finally:
        deployment.stop()
        leftovers = [
            p.pid
            for p in deployment.processes
            if psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE
        ]
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def processes_while_serving(deployment: Deployment) -> list[psutil.Process]:
    """Taken before any test stops or adds a process: the SuperLink, its SuperExec, nginx
    and its worker, and the three SuperNodes with what they started."""
    return deployment.started_processes()


def _submit(deployment: Deployment, run_dir: str, rounds: int, *settings: str, timeout: float = 600) -> dict:
    """A DP run over the three sites, submitted with stock `flwr run` and waited for; Flower's record of it."""
    run_config = (
        f"rounds={rounds} dataset='{deployment.root / 'data' / 'coordinator.npz'}' "
        f"run-dir='{deployment.root / run_dir}' min-sites=3 batch-size=32 local-epochs=1 "
        f"site-book='{deployment.site_book}' {' '.join(settings)}"
    )
    result = deployment.run(
        "coordinator", commands.run_command(deployment.app, CONNECTION, run_config), timeout=timeout
    )
    started = re.search(r"Successfully started run (\d+)", result.stdout)
    assert result.returncode == 0 and started, result.stdout + result.stderr
    # `flwr run --stream` exits 0 even when the ServerApp fails; Flower's own record says how it ended.
    (run,) = deployment.flwr_json("list", "--run-id", started.group(1))["runs"]
    return run


@pytest.fixture(scope="module")
def finished_run(deployment: Deployment) -> dict:
    """The first study on every site's data, each site with its default policy (a study may
    have a quarter of the site's budget: hospital-c's is exactly 1): it asks epsilon 1. The
    impostor's SuperNode, online as `hospital-b` beside the real one, takes part."""
    return _submit(deployment, "run", ROUNDS, "study-epsilon=1.0")


@dataclass(frozen=True)
class Unregistered:
    """What unregistering the impostor by name did; exit: its SuperNode's exit code (None: still running)."""

    unregistered: subprocess.CompletedProcess[str]
    listed: subprocess.CompletedProcess[str]
    exit: int | None


@pytest.fixture(scope="module")
def impostor_unregistered(deployment: Deployment, finished_run: dict) -> Unregistered:
    """Once the first study is over, the coordinator unregisters the impostor by name; every
    later run is among the three hospitals alone."""
    key = str(deployment.site_keys(IMPOSTOR).site_key(IMPOSTOR))
    (impostor,) = [process for process in deployment.processes if key in process.args]
    unregistered = deployment.run("coordinator", commands.unregister_command(IMPOSTOR, CONNECTION))
    try:
        exit_code: int | None = impostor.wait(timeout=UNREGISTERED_EXIT_S)
    except subprocess.TimeoutExpired:
        exit_code = None
    listed = deployment.run("coordinator", ["cohort", "site", "list", CONNECTION])
    return Unregistered(unregistered, listed, exit_code)


@pytest.fixture(scope="module")
def secure_run(deployment: Deployment, impostor_unregistered: Unregistered) -> dict:
    """One round of the same run under secure aggregation: the coordinator sees only the
    sum. The study's ask and each of its four exchanges start a flwr-clientapp process at
    every site (a plain round starts one), hence the longer wait. It asks epsilon 0.5, so
    that hospital-c has enough left for the studies below."""
    return _submit(
        deployment, "run-secure", 1, "secure-aggregation=true", "study-epsilon=0.5", timeout=SECURE_RUN_TIMEOUT_S
    )


def test_dp_run_over_three_authenticated_sites_completes(deployment: Deployment, finished_run: dict) -> None:
    assert finished_run["status"] == "finished:completed", finished_run
    summary = RunDirectory(deployment.root / "run").read_summary()
    assert summary is not None and summary.rounds == ROUNDS and not summary.stop_reason
    assert {name for name, site in summary.sites.items() if site.rounds_trained} == set(SITES)


def test_every_site_ledger_records_each_round_within_its_own_budget(deployment: Deployment, finished_run: dict) -> None:
    for site, budget in SITES.items():
        state = deployment.state(site)
        entries = read_entries(state / "privacy_ledger.jsonl")
        assert verify_chain(entries, load_public_key(state / "ledger_key.pub.pem")) is None
        assert [(e.record.kind, e.record.round) for e in entries] == [("release", r) for r in range(1, ROUNDS + 1)]
        assert all(e.record.budget_epsilon == budget and 0 < e.record.epsilon <= budget for e in entries)


def _run_records(deployment: Deployment, site: str, run_id: int) -> list[LedgerRecord]:
    return [e.record for e in read_entries(deployment.state(site) / LEDGER_FILE) if e.record.run_id == run_id]


def test_a_study_asking_epsilon_1_is_granted_by_every_site_and_spends_at_most_that(
    deployment: Deployment, finished_run: dict
) -> None:
    for site in SITES:
        releases = _run_records(deployment, site, int(finished_run["run-id"]))
        assert [(r.kind, r.study_epsilon) for r in releases] == [("release", 1.0)] * ROUNDS
        assert 0 < releases[-1].epsilon <= 1.0, "the site's first study"


def test_a_sites_ledger_names_the_code_the_model_and_the_coordinator_of_each_study(
    deployment: Deployment, finished_run: dict
) -> None:
    for site in SITES:
        for release in _run_records(deployment, site, int(finished_run["run-id"])):
            assert (
                len(release.fab_hash) == 64
                and release.model == "scatternet"
                and release.coordinator == deployment.address
            )


def test_a_securely_aggregated_run_completes_and_every_ledger_verifies(
    deployment: Deployment, secure_run: dict
) -> None:
    assert secure_run["status"] == "finished:completed", secure_run
    run_dir = RunDirectory(deployment.root / "run-secure")
    summary = run_dir.read_summary()
    assert summary is not None and summary.rounds == 1 and not summary.stop_reason
    for record in run_dir.read_metrics():
        assert {name for name, site in record.sites.items() if site.trained} == set(SITES)
        assert all(site.update_norm is None for site in record.sites.values()), (
            "the coordinator never sees an update to measure"
        )
    copied = read_entries(run_dir.ledger_file)
    for site in SITES:
        state = deployment.state(site)
        key = load_public_key(state / "ledger_key.pub.pem")
        assert verify_chain(read_entries(state / "privacy_ledger.jsonl"), key) is None
        own = [e for e in copied if e.record.site == site]
        assert [(e.record.kind, e.record.round) for e in own] == [("release", 1)]
        assert all(verify_signature(e, key) for e in own)


def test_deployed_sites_draw_secure_noise_so_opacus_warns_of_no_insecure_rng(
    deployment: Deployment, finished_run: dict
) -> None:
    """The site's DP-SGD noise and batches come from Cohort's secure source (docs/site.md),
    not from the generator Opacus warns about."""
    for site in SITES:
        assert "Secure RNG turned off" not in deployment.log(site), site


def _assert_refused_by_the_front_door(result: subprocess.CompletedProcess[str], route: str) -> None:
    """flwr reports the front door's answer as "Client error '403 Forbidden' for url '.../ROUTE'"."""
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert "403 Forbidden" in output and route in output, output


def test_coordinator_flwr_on_loopback_lists_runs_and_nodes(deployment: Deployment) -> None:
    assert deployment.flwr_json("ls")["success"]
    assert len(deployment.flwr_json("supernode", "list")["nodes"]) == REGISTERED


def test_site_flwr_ls_through_the_front_door_is_refused(deployment: Deployment) -> None:
    _assert_refused_by_the_front_door(
        deployment.run("hospital-a", ["flwr", "ls", SITE_CONNECTION]), "/v1/control/list-runs"
    )


def test_site_flwr_run_through_the_front_door_is_refused(deployment: Deployment) -> None:
    _assert_refused_by_the_front_door(
        deployment.run("hospital-a", ["flwr", "run", str(deployment.app), SITE_CONNECTION]), "/v1/control/start-run"
    )


def test_site_flwr_supernode_register_through_the_front_door_is_refused(deployment: Deployment) -> None:
    intruder_key = deployment.site_keys("intruder").site_public_key("intruder")
    _assert_refused_by_the_front_door(
        deployment.run("hospital-a", ["flwr", "supernode", "register", str(intruder_key), SITE_CONNECTION]),
        "/v1/control/register-node",
    )
    assert len(deployment.flwr_json("supernode", "list")["nodes"]) == REGISTERED


def test_site_flwr_supernode_list_through_the_front_door_is_refused(deployment: Deployment) -> None:
    _assert_refused_by_the_front_door(
        deployment.run("hospital-a", ["flwr", "supernode", "list", SITE_CONNECTION]), "/v1/control/list-nodes"
    )


@pytest.mark.parametrize(
    "route", ["/v1/control/list-runs", "/v1/control/list-nodes", "/v1/runtime/get-nodes", "/docs", "/health"]
)
def test_raw_request_signed_with_a_registered_site_key_is_refused_outside_the_fleet_api(
    deployment: Deployment, route: str
) -> None:
    """Signed the way a SuperNode signs its Fleet calls, with hospital-a's registered key."""
    key = serialization.load_ssh_private_key(
        deployment.site_keys("hospital-a").site_key("hospital-a").read_bytes(), password=None
    )
    timestamp = now().isoformat()
    headers = {
        "content-type": "application/protobuf",
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),  # type: ignore[arg-type]
        "flwr-timestamp": timestamp,
        "flwr-signature": b64encode(sign_message(key, timestamp.encode())).decode(),  # type: ignore[arg-type]
    }
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    response = httpx.post(
        f"https://{deployment.address}{route}", headers=headers, content=b"", verify=context, timeout=10
    )
    assert response.status_code == 403 and REFUSAL in response.text, response.text


def test_every_process_the_deployment_started_runs_with_flower_telemetry_off(
    processes_while_serving: list[psutil.Process],
) -> None:
    """Every Flower process: the SuperLink, its SuperExec, each SuperNode and what it
    started, although the test starts `cohort` without the variable. (`cohort superlink`
    itself only supervises, and nginx is not Flower and starts with an empty environment.)"""
    flower = [p for p in processes_while_serving if not p.name().startswith(("nginx", "cohort"))]
    assert len(flower) < len(processes_while_serving), "the supervisor and the front door are not among the processes"
    assert {"flower-superlink", "flower-superexec", "flower-supernode"} <= {
        Path(p.cmdline()[1]).name for p in flower if len(p.cmdline()) > 1
    }
    environments = {" ".join(p.cmdline()[:2]): p.environ().get("FLWR_TELEMETRY_ENABLED") for p in flower}
    assert set(environments.values()) == {"0"}, environments


def test_supernode_whose_key_was_not_registered_is_refused(deployment: Deployment) -> None:
    intruder = deployment.spawn(
        "intruder", deployment.supernode("intruder", deployment.site_keys("intruder").site_key("intruder"))
    )
    assert intruder.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")


def test_supernode_trusting_another_ca_cannot_connect(deployment: Deployment) -> None:
    other = deployment.root / "other-ca"
    init_certificates(other, ["localhost"], passphrase=PASSPHRASE)
    command = [
        "flower-supernode", "--superlink", deployment.address,
        "--root-certificates", str(CertificateLayout(other).ca_cert),
        "--auth-supernode-private-key", str(deployment.site_keys("hospital-a").site_key("hospital-a")),
        "--port", str(free_port()), "--max-retries", "1",
    ]  # fmt: skip
    stranger = deployment.spawn("other-ca", command)
    assert stranger.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("other-ca")


def test_supernode_without_tls_is_refused(deployment: Deployment) -> None:
    command = [
        "flower-supernode",
        "--superlink",
        deployment.address,
        "--insecure",
        "--port",
        str(free_port()),
        "--max-retries",
        "2",
    ]
    plain = deployment.spawn("insecure", command)
    assert plain.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "400 Bad Request" in deployment.log("insecure")  # nginx: a plain HTTP request sent to its HTTPS port


def test_cohort_supernode_names_the_ca_file_when_the_superlink_is_not_signed_by_it(deployment: Deployment) -> None:
    other = CertificateLayout(deployment.root / "other-ca-2")
    init_certificates(other.root, ["localhost"], passphrase=PASSPHRASE)
    create_site_key(other.root, "hospital-a")
    command = deployment.supernode("hospital-a", other.site_key("hospital-a"))
    command[command.index("--ca-cert") + 1] = str(other.ca_cert)
    result = deployment.run("hospital-a-wrong-ca", command)
    assert result.returncode == 2
    assert f"{other.ca_cert} does not trust" in result.stderr and "Traceback" not in result.stderr


def _clientapps_of(process: subprocess.Popen[bytes]) -> set[int]:
    """The ClientApp processes a site's SuperNode runs now, one per task it is answering:
    the site's own `flwr-clientapp`, which launches the task in the site's fork server."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for child in children:
        try:
            if child.cmdline()[3:5] == [CLIENTAPP_FORKSERVER_MODULE, "launch"]:
                found.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def _new_clientapps(
    site_process: subprocess.Popen[bytes],
    known: set[int],
    deadline: float,
    run: subprocess.Popen[bytes],
    deployment: Deployment,
) -> set[int]:
    """Wait for a ClientApp process of the site that is not among `known`; returns the new ones."""
    while not _clientapps_of(site_process) - known:
        assert time.monotonic() < deadline and run.poll() is None, deployment.log("run-killed-site")
        time.sleep(0.05)
    return _clientapps_of(site_process) - known


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a crash or the OOM killer would: no handler runs, nothing is flushed."""
    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    for member in tree:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    process.wait()


@dataclass(frozen=True)
class KilledSiteRun:
    run_id: int
    run_dir: Path
    status: str
    trained_when_killed: int


@pytest.fixture(scope="module")
def run_with_a_site_killed_mid_round(deployment: Deployment, impostor_unregistered: Unregistered) -> KilledSiteRun:
    """A study that asks for all each site will grant (the default), over KILLED_SITE_ROUNDS
    rounds with min-sites=2; hospital-c's SuperNode and everything under it are killed while
    its flwr-clientapp answers round 1's training message (after it answered the study's ask),
    then `cohort supernode` is started again with the same key, state and data once the
    SuperLink holds it offline."""
    (site_process,) = [p for p in deployment.processes if KILLED_SITE in p.args and "supernode" in p.args]
    ledger = deployment.state(KILLED_SITE) / LEDGER_FILE
    entries_before = len(read_entries(ledger))
    idle = _clientapps_of(site_process)
    run_dir = deployment.root / "run-killed-site"
    run_config = (
        f"rounds={KILLED_SITE_ROUNDS} dataset='{deployment.root / 'data' / 'coordinator.npz'}' run-dir='{run_dir}' "
        f"min-sites=2 batch-size=32 local-epochs=1 reply-timeout={REPLY_TIMEOUT_S} site-book='{deployment.site_book}'"
    )
    log = (deployment.root / "logs" / "run-killed-site.log").open("wb")
    command = _local(commands.run_command(deployment.app, CONNECTION, run_config))
    run = subprocess.Popen(
        command,
        env=offline_flower_env(deployment.home("coordinator")),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=deployment.root,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        asked = _new_clientapps(site_process, idle, deadline, run, deployment)  # the study's ask, before round 1
        while _clientapps_of(site_process) & asked:
            assert time.monotonic() < deadline and run.poll() is None, deployment.log("run-killed-site")
            time.sleep(0.05)
        _new_clientapps(site_process, idle | asked, deadline, run, deployment)  # round 1's training
        _kill_tree(site_process)
        trained_when_killed = len(read_entries(ledger)) - entries_before
        # The SuperLink refuses to activate a node it still holds online ("Failed to
        # activate SuperNode"): the site is started again once it has missed its heartbeats.
        _wait_for_online(deployment, len(SITES) - 1)
        deployment.spawn(
            KILLED_SITE, deployment.supernode(KILLED_SITE, deployment.site_keys(KILLED_SITE).site_key(KILLED_SITE))
        )
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            stop_process_tree(run.pid)
        log.close()
    started = re.search(r"Successfully started run (\d+)", deployment.log("run-killed-site"))
    assert run.returncode == 0 and started, deployment.log("run-killed-site")
    (flower_run,) = deployment.flwr_json("list", "--run-id", started.group(1))["runs"]
    return KilledSiteRun(int(started.group(1)), run_dir, flower_run["status"], trained_when_killed)


def _trained_rounds(run_dir: Path) -> dict[str, list[int]]:
    trained: dict[str, list[int]] = {}
    for record in RunDirectory(run_dir).read_metrics():
        for site, values in record.sites.items():
            if values.trained:
                trained.setdefault(site, []).append(record.round)
    return trained


def test_a_site_killed_mid_round_fails_that_round_after_the_reply_timeout_and_the_others_complete_it(
    run_with_a_site_killed_mid_round: KilledSiteRun,
) -> None:
    killed = run_with_a_site_killed_mid_round
    assert killed.status == "finished:completed", killed
    summary = RunDirectory(killed.run_dir).read_summary()
    assert summary is not None and summary.rounds == KILLED_SITE_ROUNDS and not summary.stop_reason, summary
    first = RunDirectory(killed.run_dir).read_metrics()[0]
    # The server knows the node by its registered name, although it never answered this run.
    # Either the timeout ends its wait, or the SuperLink answers for the node first, once
    # it has missed two heartbeats (Flower's interval is 30 s).
    ((site, stage, reason),) = [(f.site, f.stage, f.reason) for f in first.failures]
    assert (site, stage) == (KILLED_SITE, "train")
    assert reason == f"no reply within {REPLY_TIMEOUT_S}s" or "Node Unavailable" in reason, reason
    assert sorted(site for site, values in first.sites.items() if values.trained) == sorted(set(SITES) - {KILLED_SITE})


def test_the_restarted_site_rejoins_in_a_later_round(run_with_a_site_killed_mid_round: KilledSiteRun) -> None:
    trained = _trained_rounds(run_with_a_site_killed_mid_round.run_dir)
    every_round = list(range(1, KILLED_SITE_ROUNDS + 1))
    assert trained.get(KILLED_SITE) in [every_round[first:] for first in range(1, KILLED_SITE_ROUNDS)], trained
    assert all(trained[site] == every_round for site in set(SITES) - {KILLED_SITE}), trained


def test_the_killed_sites_ledger_holds_each_release_once_and_the_runs_copy_only_what_it_holds(
    run_with_a_site_killed_mid_round: KilledSiteRun, deployment: Deployment
) -> None:
    killed = run_with_a_site_killed_mid_round
    state = deployment.state(KILLED_SITE)
    entries = read_entries(state / LEDGER_FILE)
    assert verify_chain(entries, load_public_key(state / "ledger_key.pub.pem")) is None
    at_site = [e for e in entries if e.record.run_id == killed.run_id]
    copied = [LedgerEntry.from_json(line) for line in (killed.run_dir / LEDGER_FILE).read_text().splitlines()]
    in_copy = [e for e in copied if e.record.site == KILLED_SITE]
    assert len({e.record.round for e in at_site}) == len(at_site), "the site released a round twice"
    assert len({e.sequence for e in in_copy}) == len(in_copy), "the run's ledger holds a release twice"
    assert {(e.sequence, e.entry_hash()) for e in in_copy} <= {(e.sequence, e.entry_hash()) for e in at_site}
    assert sorted(e.record.round for e in in_copy) == _trained_rounds(killed.run_dir)[KILLED_SITE]
    # Killed before it could sign round 1 (its clientapp had just started), or after: then
    # that release is in its own ledger, spent, though it never reached the coordinator.
    assert (
        sorted(e.record.round for e in at_site)
        == [1] * killed.trained_when_killed + _trained_rounds(killed.run_dir)[KILLED_SITE]
    )


def test_a_site_that_declines_to_evaluate_is_not_asked_again_in_that_run(
    run_with_a_site_killed_mid_round: KilledSiteRun, deployment: Deployment
) -> None:
    """Deployed sites decline evaluation by default; over three rounds each says so once
    (the restarted site, whose name the coordinator knows from round 1 or learns again,
    at most once)."""
    log = deployment.log("run-killed-site")
    declines = {site: log.count(f"site {site} does not evaluate models it is sent") for site in SITES}
    assert declines == {**dict.fromkeys(set(SITES) - {KILLED_SITE}, 1), KILLED_SITE: declines[KILLED_SITE]}, declines
    assert declines[KILLED_SITE] <= 1, declines


@pytest.fixture(scope="module")
def restored_site(deployment: Deployment, run_with_a_site_killed_mid_round: KilledSiteRun) -> list[LedgerEntry]:
    """hospital-a's state directory restored from the backup taken before its first study,
    as its operator would after a disk failure; its ledger as it stood before the restore."""
    state = deployment.state(RESTORED_SITE)
    before = read_entries(state / LEDGER_FILE)
    for path in state.iterdir():  # the SuperNode keeps running, holding its lock
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != STATE_LOCK_FILE:
            path.unlink()
    shutil.copytree(deployment.root / "backup", state, dirs_exist_ok=True, ignore=_LOCK)
    assert not (state / LEDGER_FILE).exists() or len(read_entries(state / LEDGER_FILE)) < len(before)
    return before


@pytest.fixture(scope="module")
def study_every_site_refused(
    deployment: Deployment, restored_site: list[LedgerEntry]
) -> subprocess.CompletedProcess[str]:
    """`cohort run` of a study without DP: every site's policy forbids training without it
    (allow-non-private is off unless a site sets it), so every site refuses round 1;
    hospital-a, restored from an older backup, refuses first for that."""
    settings = [
        f"rounds={ROUNDS}", f"dataset={deployment.root / 'data' / 'coordinator.npz'}",
        f"run-dir={deployment.root / 'run-refused'}", "min-sites=3", "dp=false", "batch-size=32",
    ]  # fmt: skip
    result = deployment.run("coordinator", commands.cohort_run_command(CONNECTION, settings), timeout=600)
    (deployment.root / "logs" / "cohort-run-refused.log").write_text(result.stdout + result.stderr)
    return result


def test_cohort_run_of_a_study_every_site_refused_exits_1_naming_the_reason(
    study_every_site_refused: subprocess.CompletedProcess[str],
) -> None:
    result = study_every_site_refused
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"round   1/{ROUNDS}" in result.stdout and "refused: hospital-a, hospital-b, hospital-c" in result.stdout
    assert f"round   2/{ROUNDS}" not in result.stdout
    message = " ".join(result.stderr.split())
    assert re.fullmatch(
        r"error: run \d+ stopped after round 1: 0 update\(s\) passed the checks, fewer than min-sites=3; .*", message
    ), message
    assert "hospital-a (refused); hospital-b (refused); hospital-c (refused)" in message


def test_flower_records_a_study_every_site_refused_as_failed_with_the_reason(
    deployment: Deployment, study_every_site_refused: subprocess.CompletedProcess[str]
) -> None:
    run_id = re.search(r"error: run (\d+) stopped", study_every_site_refused.stderr)
    assert run_id, study_every_site_refused.stderr
    (run,) = deployment.flwr_json("list", "--run-id", run_id.group(1))["runs"]
    assert run["status"] == "finished:failed" and "stopped after round 1" in run["status-details"], run


def test_a_study_asking_what_each_site_grants_is_granted_what_is_left_up_to_the_sites_cap(
    deployment: Deployment,
    run_with_a_site_killed_mid_round: KilledSiteRun,
    imported_site: subprocess.CompletedProcess[str],
) -> None:
    """Read once hospital-a, restored from a backup, has imported its lost records back."""
    killed = run_with_a_site_killed_mid_round
    for site, budget in SITES.items():
        releases = [r for r in _run_records(deployment, site, killed.run_id) if r.kind == "release"]
        before = [e.record for e in read_entries(deployment.state(site) / LEDGER_FILE)]
        spent = max(
            r.epsilon
            for r in before
            if r.kind == "release" and r.run_id != killed.run_id and r.timestamp < releases[0].timestamp
        )
        assert all(r.study_epsilon == pytest.approx(min(budget / 4, budget - spent), abs=1e-6) for r in releases)
        assert spent < releases[-1].epsilon <= spent + releases[-1].study_epsilon + 1e-9


def test_a_site_restored_from_an_older_backup_refuses_naming_the_import(
    deployment: Deployment, study_every_site_refused: subprocess.CompletedProcess[str]
) -> None:
    """The coordinator sends, with every instruction, the newest entry it accepted from the
    site; the restored ledger lacks it, so the site trains on nothing it forgot."""
    log = (deployment.root / "run-refused" / "flower.log").read_text()
    (refusal,) = [line for line in log.splitlines() if f"site {RESTORED_SITE} refuses to train" in line]
    assert "restored from an older backup or cut short" in refusal and "(cohort site import)" in refusal, refusal


@pytest.fixture(scope="module")
def imported_site(
    deployment: Deployment, restored_site: list[LedgerEntry], study_every_site_refused: subprocess.CompletedProcess[str]
) -> subprocess.CompletedProcess[str]:
    """`cohort site import` of hospital-a's entries from the coordinator's run directories."""
    runs = sorted(str(path.parent) for path in deployment.root.glob(f"run*/{LEDGER_FILE}"))
    return deployment.run(
        RESTORED_SITE, ["cohort", "site", "import", "--state-dir", str(deployment.state(RESTORED_SITE)), *runs]
    )


def test_importing_from_the_coordinators_run_copies_gives_the_restored_site_back_its_whole_ledger(
    deployment: Deployment, restored_site: list[LedgerEntry], imported_site: subprocess.CompletedProcess[str]
) -> None:
    assert imported_site.returncode == 0, imported_site.stdout + imported_site.stderr
    after = read_entries(deployment.state(RESTORED_SITE) / LEDGER_FILE)
    assert [e.entry_hash() for e in after] == [e.entry_hash() for e in restored_site]


@pytest.fixture(scope="module")
def study_no_site_grants(
    deployment: Deployment,
    run_with_a_site_killed_mid_round: KilledSiteRun,
    imported_site: subprocess.CompletedProcess[str],
) -> subprocess.CompletedProcess[str]:
    """`cohort run` of a study that asks epsilon 5, more than any site's per-study cap
    (a quarter of 8, 6 and 4), once every site is online again."""
    settings = [
        "rounds=1", f"dataset={deployment.root / 'data' / 'coordinator.npz'}",
        f"run-dir={deployment.root / 'run-study-refused'}", "min-sites=2", "batch-size=32", "study-epsilon=5.0",
    ]  # fmt: skip
    result = deployment.run("coordinator", commands.cohort_run_command(CONNECTION, settings), timeout=600)
    (deployment.root / "logs" / "cohort-run-study-refused.log").write_text(result.stdout + result.stderr)
    return result


def _run_id(result: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"run (\d+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return int(found.group(1))


def test_a_study_asking_more_than_any_site_grants_is_refused_by_all_before_round_1_with_the_reason(
    study_no_site_grants: subprocess.CompletedProcess[str],
) -> None:
    result = study_no_site_grants
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and "stopped before round 1" in message, result.stdout + result.stderr
    assert "round   1/" not in result.stdout, result.stdout
    for site in SITES:
        assert f"site {site} refuses the study: it asks epsilon 5; the site grants at most" in message, message


def test_a_site_records_its_refusal_of_a_study_before_reading_its_data(
    deployment: Deployment, study_no_site_grants: subprocess.CompletedProcess[str]
) -> None:
    for site in SITES:
        (refusal,) = _run_records(deployment, site, _run_id(study_no_site_grants))
        assert (refusal.kind, refusal.round, refusal.dataset_hash) == ("refusal", 0, "")


def test_each_sites_audit_lists_the_three_studies_with_their_dates_and_epsilons(
    deployment: Deployment,
    finished_run: dict,
    run_with_a_site_killed_mid_round: KilledSiteRun,
    study_no_site_grants: subprocess.CompletedProcess[str],
) -> None:
    first, refused, third = (
        int(finished_run["run-id"]),
        _run_id(study_no_site_grants),
        run_with_a_site_killed_mid_round.run_id,
    )
    for site in SITES:
        out = deployment.root / f"audit-{site}"
        result = subprocess.run(
            [str(BIN / "cohort"), "audit", str(deployment.state(site)), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**offline_flower_env(deployment.home(site)), "COLUMNS": "80"},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        (deployment.root / "logs" / f"audit-{site}.txt").write_text(result.stdout)
        listed = {s["run_id"]: s for s in json.loads((out / "audit.json").read_text())["sites"][site]["studies"]}
        assert all(listed[run]["first"] and listed[run]["last"] for run in (first, refused, third)), listed
        assert (listed[first]["epsilon_granted"], listed[refused]["epsilon_granted"]) == (1.0, None)
        assert listed[third]["epsilon_granted"] > 0 and listed[third]["epsilon_spent"] > 0


def test_the_logs_of_cohorts_commands_hold_each_serverapp_line_once_and_no_colour_codes(
    deployment: Deployment, study_every_site_refused: subprocess.CompletedProcess[str]
) -> None:
    """What `cohort superlink`, each `cohort supernode` and `cohort run` wrote (the run's
    flower.log is the ServerApp's log as `flwr run --stream` relays it)."""
    flower = deployment.root / "run-refused" / "flower.log"
    logs = [deployment.root / "logs" / f"{role}.log" for role in ("superlink", *SITES, "cohort-run-refused")] + [flower]
    assert [log.name for log in logs if "\x1b[" in log.read_text(errors="replace")] == []
    assert flower.read_text().count("Round 1: global accuracy") == 1, flower.read_text()


def _superlink_process(deployment: Deployment) -> psutil.Process:
    (superlink,) = [p for p in deployment.started_processes() if "flower-superlink" in " ".join(p.cmdline()[:2])]
    return superlink


@contextmanager
def _peak_memory(process: psutil.Process) -> Iterator[list[int]]:
    """Samples the process's resident memory every 20 ms while the block runs; yields
    [resident before, peak], the peak filled in when the block ends."""
    figures = [process.memory_info().rss, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            figures[1] = max(figures[1], process.memory_info().rss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield figures
    finally:
        time.sleep(0.5)  # what the SuperLink still does with the last body
        done.set()
        sampler.join()


def _push_zeros(deployment: Deployment, route: str, size: int, source: str, chunked: bool = False) -> tuple[int, int]:
    """An unauthenticated POST of `size` zero bytes (declared up front, or chunked without
    a length), sent 1 MiB at a time until the front door answers or the body is all sent.
    Returns the HTTP status and how many body bytes left this client."""
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    raw = socket.create_connection((SITES_ADDRESS, deployment.port), timeout=300, source_address=(source, 0))
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        tls.sendall(
            (
                f"POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n{framing}\r\n\r\n"
            ).encode()
        )
        block, sent, answer = bytes(MB), 0, b""
        try:
            while sent < size and not answer:
                piece = block[: min(MB, size - sent)]
                tls.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
                sent += len(piece)
                answer = _answer_so_far(tls)
            if chunked and not answer:
                tls.sendall(b"0\r\n\r\n")
            answer = answer or tls.recv(4096)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            answer = tls.recv(4096)  # the front door answered and closed while this client was still sending
    return int(answer.split(b" ", 2)[1]), sent


def _answer_so_far(tls: ssl.SSLSocket) -> bytes:
    """Whatever HTTP answer has arrived, without waiting for one."""
    tls.setblocking(False)
    try:
        return tls.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    finally:
        tls.setblocking(True)


def test_bulk_unauthenticated_bodies_are_refused_before_the_superlink_holds_them(deployment: Deployment) -> None:
    """One 300 MB body, one of 600 MB without a length, then three of 400 MB at once: on
    the Fleet routes that carry the most, from an address that holds no registered key."""
    attacker = "127.0.0.2"
    with _peak_memory(_superlink_process(deployment)) as memory:
        answers = [
            _push_zeros(deployment, "/v1/fleet/push-messages", 300 * MB, attacker),
            _push_zeros(deployment, OBJECT_ROUTE, 600 * MB, attacker, chunked=True),
        ]
        with ThreadPoolExecutor(3) as pool:
            answers += pool.map(lambda _: _push_zeros(deployment, OBJECT_ROUTE, 400 * MB, attacker), range(3))
    before, peak = memory
    assert peak - before <= MEMORY_BOUND, (
        f"the SuperLink grew by {(peak - before) / MB:.0f} MB (from {before / MB:.0f} MB): {answers}"
    )
    assert [status for status, _ in answers] == [413] * 5, answers
    assert all(sent < 100 * MB for _, sent in answers), answers  # refused long before the end


def test_a_fleet_route_with_a_trailing_newline_is_refused_by_the_front_door(deployment: Deployment) -> None:
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    response = httpx.post(
        f"https://{deployment.address}/v1/fleet/pull-messages%0A", content=b"", verify=context, timeout=10
    )
    assert response.status_code == 403 and REFUSAL in response.text, response.text


def test_each_fleet_route_takes_a_body_up_to_its_limit_and_refuses_a_byte_more(deployment: Deployment) -> None:
    """A body at the limit reaches Flower (which answers in JSON that it is no valid
    request); one byte more gets nginx's 413 and never reaches it."""
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    transport = httpx.HTTPTransport(verify=context, local_address="127.0.0.5")
    answers = {}
    with httpx.Client(transport=transport, timeout=60) as client:
        for route in fleet_routes():
            limit = LIMITS.body_limit(route)
            at_limit = client.post(f"https://{deployment.address}{route}", content=bytes(limit))
            beyond = client.post(f"https://{deployment.address}{route}", content=bytes(limit + 1))
            answers[route] = (at_limit.headers.get("content-type"), beyond.status_code)
    assert all(at == "application/json" and beyond == 413 for at, beyond in answers.values()), answers


def test_one_address_is_answered_503_past_its_burst_of_requests(deployment: Deployment) -> None:
    """GETs on a Fleet route: counted by the rate limit, then refused by nginx itself
    (POST only), so the flood never reaches the SuperLink."""
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    transport = httpx.HTTPTransport(verify=context, local_address="127.0.0.3")
    answered = 0
    started = time.monotonic()
    with httpx.Client(transport=transport, timeout=10) as client:
        while (status := client.get(f"https://{deployment.address}/v1/fleet/pull-messages").status_code) == 403:
            answered += 1
            assert answered <= 10 * LIMITS.burst_per_address, "never throttled"
    elapsed = time.monotonic() - started
    assert status == 503
    assert (
        LIMITS.burst_per_address
        <= answered
        <= LIMITS.burst_per_address + LIMITS.requests_per_second_per_address * elapsed + 1
    )


@pytest.mark.parametrize(
    ("route", "allowance"),
    [("/v1/fleet/push-messages", "connections_per_address"), (OBJECT_ROUTE, "object_pushes_per_address")],
)
def test_one_address_has_at_most_its_allowance_of_requests_in_flight(
    deployment: Deployment, route: str, allowance: str
) -> None:
    """Requests whose bodies are still arriving hold their place (nginx reads a body whole
    before the SuperLink sees it); the next from the same address is answered 503 at once."""
    in_flight = getattr(LIMITS, allowance)
    source = "127.0.0.4" if route == OBJECT_ROUTE else "127.0.0.6"
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    started: list[ssl.SSLSocket] = []
    try:
        for _ in range(in_flight + 1):
            raw = socket.create_connection((SITES_ADDRESS, deployment.port), timeout=10, source_address=(source, 0))
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(
                f"POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n".encode() + bytes(10)
            )
            started.append(tls)
        time.sleep(0.5)
        answered = [_answer_so_far(tls) for tls in started]
    finally:
        for tls in started:
            tls.close()
    assert [answer[:12] for answer in answered] == [b""] * in_flight + [b"HTTP/1.1 503"], answered


def test_the_federation_was_never_throttled_nor_refused_a_body(
    deployment: Deployment, finished_run: dict, run_with_a_site_killed_mid_round: KilledSiteRun
) -> None:
    """After both runs, nginx (whose log is in `cohort superlink`'s) has refused nothing the sites sent."""
    refused = ("limiting requests", "limiting connections", "client intended to send too large body")
    refusals = [
        line
        for line in deployment.log("superlink").splitlines()
        if f"client: {SITES_ADDRESS}," in line and any(r in line for r in refused)
    ]
    assert not refusals, refusals


def test_a_registered_site_claiming_another_sites_name_is_rejected_under_its_own_name(
    deployment: Deployment, finished_run: dict
) -> None:
    for record in RunDirectory(deployment.root / "run").read_metrics():
        ((node, site, reason),) = [(r.node, r.site, r.reason) for r in record.rejected]
        assert (site, reason) == (IMPOSTOR, f"node {node} is registered as {IMPOSTOR} but claims to be hospital-b")
        assert sorted(site for site, values in record.sites.items() if values.trained) == sorted(SITES)


def test_every_entry_the_run_recorded_as_hospital_b_is_signed_by_hospital_bs_own_key(
    deployment: Deployment, finished_run: dict
) -> None:
    key = load_public_key(deployment.state("hospital-b") / "ledger_key.pub.pem")
    copied = [LedgerEntry.from_json(line) for line in (deployment.root / "run" / LEDGER_FILE).read_text().splitlines()]
    as_b = [entry for entry in copied if entry.record.site == "hospital-b"]
    assert len(as_b) == ROUNDS and all(verify_signature(entry, key) for entry in as_b)


def test_a_site_unregistered_by_name_is_listed_unregistered_and_its_supernode_says_why_it_stops(
    deployment: Deployment, impostor_unregistered: Unregistered
) -> None:
    assert impostor_unregistered.unregistered.returncode == 0, impostor_unregistered.unregistered.stderr
    listed = impostor_unregistered.listed
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{IMPOSTOR}: node -, unregistered", listed.stdout, re.MULTILINE), listed.stdout
    assert re.search(r"^hospital-b: node \d+, online, newest entry \d+", listed.stdout, re.MULTILINE), listed.stdout
    assert impostor_unregistered.exit == 2, deployment.log(IMPOSTOR)
    assert f"error: site hospital-b: the SuperLink no longer admits this SuperNode's key {IMPOSTOR}.key" in " ".join(
        deployment.log(IMPOSTOR).split()
    ), deployment.log(IMPOSTOR)
