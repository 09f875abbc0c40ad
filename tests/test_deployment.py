"""A real deployment on 127.0.0.1: `cohort superlink` (a TLS SuperLink on loopback that
admits only registered SuperNodes, behind the nginx front door), three hospital
SuperNodes with their own data, budgets, state and key pairs made at the site, and a DP
run submitted with stock `flwr run` on the coordinator's loopback. A site that holds
ca.crt and a registered key reaches the Fleet API and nothing else. Every command comes
from the recipe in deploy/commands.py, the same one docker/compose.yml and docs/deploy.md use."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import time
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil
import pytest

from cryptography.hazmat.primitives import serialization
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from common.flower_runtime import offline_flower_env
from common.privacy.ledger import load_public_key, read_entries, verify_chain
from deploy import commands
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from deploy.front_door import REFUSAL
from simulations.local_superlink import free_port, stop_process_tree
from tests.conftest import make_images

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed (make test installs it when run as root)")
APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "cohort-test"
SITE_CONNECTION = "front-door"
PASSPHRASE = b"the coordinator's passphrase"
SITES = {"hospital-a": 8.0, "hospital-b": 6.0, "hospital-c": 4.0}
ROUNDS = 2
STARTUP_TIMEOUT_S = 120.0


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
    def local_address(self) -> str:
        return f"127.0.0.1:{self.local_port}"

    def home(self, role: str) -> Path:
        return self.root / "homes" / role

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
        return subprocess.run(_local(command), env=offline_flower_env(self.home(role)), capture_output=True, text=True, timeout=timeout, cwd=self.root)

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
            state_dir=self.root / "state" / site,
            epsilon=SITES.get(site, 8.0),
            delta=1e-5,
            port=free_port(),
        )

    def stop(self) -> None:
        for process in self.processes:
            stop_process_tree(process.pid)
            process.wait()


def _write_data(directory: Path) -> None:
    directory.mkdir(parents=True)
    for seed, name in enumerate([*SITES, "intruder", "coordinator"]):
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
    for site in [*SITES, "intruder"]:
        create_site_key(deployment.site_keys(site).root, site)
    _write_data(deployment.root / "data")
    try:
        superlink_command = commands.superlink_command(
            deployment.certs.root, deployment.root / "superlink.db", "127.0.0.1", deployment.port, deployment.local_port
        )
        _wait_for_front_door(deployment, deployment.spawn("superlink", superlink_command))
        connect = deployment.run("coordinator", commands.connect_command(CONNECTION, deployment.local_address, deployment.certs.ca_cert))
        assert connect.returncode == 0, connect.stderr
        for site in SITES:
            registered = deployment.run("coordinator", commands.register_command(_receive_public_key(deployment, site), CONNECTION))
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for site in SITES:
            deployment.spawn(site, deployment.supernode(site, deployment.site_keys(site).site_key(site)))
        _wait_for_online(deployment, len(SITES))
        # A site's own flwr, pointed at the address it reaches: the front door.
        site_connect = deployment.run("hospital-a", commands.connect_command(SITE_CONNECTION, deployment.address, deployment.certs.ca_cert))
        assert site_connect.returncode == 0, site_connect.stderr
        yield deployment
    finally:
        deployment.stop()
        leftovers = [p.pid for p in deployment.processes if psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE]
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def processes_while_serving(deployment: Deployment) -> list[psutil.Process]:
    """Taken before any test stops or adds a process: the SuperLink, its SuperExec, nginx
    and its worker, and the three SuperNodes with what they started."""
    return deployment.started_processes()


@pytest.fixture(scope="module")
def finished_run(deployment: Deployment) -> dict:
    run_config = (
        f"rounds={ROUNDS} dataset='{deployment.root / 'data' / 'coordinator.npz'}' run-dir='{deployment.root / 'run'}' "
        "min-sites=3 batch-size=32 local-epochs=1"
    )
    result = deployment.run("coordinator", commands.run_command(APP_DIR, CONNECTION, run_config), timeout=600)
    started = re.search(r"Successfully started run (\d+)", result.stdout)
    assert result.returncode == 0 and started, result.stdout + result.stderr
    # `flwr run --stream` exits 0 even when the ServerApp fails; Flower's own record says how it ended.
    (run,) = deployment.flwr_json("list", "--run-id", started.group(1))["runs"]
    return run


def test_dp_run_over_three_authenticated_sites_completes(deployment: Deployment, finished_run: dict) -> None:
    assert finished_run["status"] == "finished:completed", finished_run
    summary = json.loads((deployment.root / "run" / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and not summary["stop_reason"]
    assert set(summary["sites"]) == set(SITES)


def test_every_site_ledger_records_each_round_within_its_own_budget(deployment: Deployment, finished_run: dict) -> None:
    for site, budget in SITES.items():
        state = deployment.root / "state" / site
        entries = read_entries(state / "privacy_ledger.jsonl")
        assert verify_chain(entries, load_public_key(state / "ledger_key.pub.pem")) is None
        assert [(e.record.kind, e.record.round) for e in entries] == [("release", r) for r in range(1, ROUNDS + 1)]
        assert all(e.record.budget_epsilon == budget and 0 < e.record.epsilon <= budget for e in entries)


def _assert_refused_by_the_front_door(result: subprocess.CompletedProcess[str], route: str) -> None:
    """flwr reports the front door's answer as "Client error '403 Forbidden' for url '.../ROUTE'"."""
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert "403 Forbidden" in output and route in output, output


def test_coordinator_flwr_on_loopback_lists_runs_and_nodes(deployment: Deployment) -> None:
    assert deployment.flwr_json("ls")["success"]
    assert len(deployment.flwr_json("supernode", "list")["nodes"]) == len(SITES)


def test_site_flwr_ls_through_the_front_door_is_refused(deployment: Deployment) -> None:
    _assert_refused_by_the_front_door(deployment.run("hospital-a", ["flwr", "ls", SITE_CONNECTION]), "/v1/control/list-runs")


def test_site_flwr_run_through_the_front_door_is_refused(deployment: Deployment) -> None:
    _assert_refused_by_the_front_door(deployment.run("hospital-a", ["flwr", "run", str(APP_DIR), SITE_CONNECTION]), "/v1/control/start-run")


def test_site_flwr_supernode_register_through_the_front_door_is_refused(deployment: Deployment) -> None:
    intruder_key = deployment.site_keys("intruder").site_public_key("intruder")
    _assert_refused_by_the_front_door(
        deployment.run("hospital-a", ["flwr", "supernode", "register", str(intruder_key), SITE_CONNECTION]), "/v1/control/register-node"
    )
    assert len(deployment.flwr_json("supernode", "list")["nodes"]) == len(SITES)


def test_site_flwr_supernode_list_through_the_front_door_is_refused(deployment: Deployment) -> None:
    _assert_refused_by_the_front_door(deployment.run("hospital-a", ["flwr", "supernode", "list", SITE_CONNECTION]), "/v1/control/list-nodes")


@pytest.mark.parametrize("route", ["/v1/control/list-runs", "/v1/control/list-nodes", "/v1/runtime/get-nodes", "/docs", "/health"])
def test_raw_request_signed_with_a_registered_site_key_is_refused_outside_the_fleet_api(deployment: Deployment, route: str) -> None:
    """Signed the way a SuperNode signs its Fleet calls, with hospital-a's registered key."""
    key = serialization.load_ssh_private_key(deployment.site_keys("hospital-a").site_key("hospital-a").read_bytes(), password=None)
    timestamp = now().isoformat()
    headers = {
        "content-type": "application/protobuf",
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),  # type: ignore[arg-type]
        "flwr-timestamp": timestamp,
        "flwr-signature": b64encode(sign_message(key, timestamp.encode())).decode(),  # type: ignore[arg-type]
    }
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    response = httpx.post(f"https://{deployment.address}{route}", headers=headers, content=b"", verify=context, timeout=10)
    assert response.status_code == 403 and REFUSAL in response.text, response.text


def test_every_process_the_deployment_started_runs_with_flower_telemetry_off(processes_while_serving: list[psutil.Process]) -> None:
    """Every Flower process: the SuperLink, its SuperExec, each SuperNode and what it
    started, although the test starts `cohort` without the variable. (`cohort superlink`
    itself only supervises, and nginx is not Flower and starts with an empty environment.)"""
    flower = [p for p in processes_while_serving if not p.name().startswith(("nginx", "cohort"))]
    assert len(flower) < len(processes_while_serving), "the supervisor and the front door are not among the processes"
    assert {"flower-superlink", "flower-superexec", "flower-supernode"} <= {Path(p.cmdline()[1]).name for p in flower if len(p.cmdline()) > 1}
    environments = {" ".join(p.cmdline()[:2]): p.environ().get("FLWR_TELEMETRY_ENABLED") for p in flower}
    assert set(environments.values()) == {"0"}, environments


def test_supernode_whose_key_was_not_registered_is_refused(deployment: Deployment) -> None:
    intruder = deployment.spawn("intruder", deployment.supernode("intruder", deployment.site_keys("intruder").site_key("intruder")))
    assert intruder.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")


def test_supernode_trusting_another_ca_cannot_connect(deployment: Deployment) -> None:
    other = deployment.root / "other-ca"
    init_certificates(other, ["localhost"], passphrase=PASSPHRASE)
    command = [
        "flower-supernode", "--superlink", deployment.address, "--root-certificates", str(CertificateLayout(other).ca_cert),
        "--auth-supernode-private-key", str(deployment.site_keys("hospital-a").site_key("hospital-a")), "--port", str(free_port()), "--max-retries", "1",
    ]  # fmt: skip
    stranger = deployment.spawn("other-ca", command)
    assert stranger.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("other-ca")


def test_supernode_without_tls_is_refused(deployment: Deployment) -> None:
    command = ["flower-supernode", "--superlink", deployment.address, "--insecure", "--port", str(free_port()), "--max-retries", "2"]
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
