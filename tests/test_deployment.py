"""A real deployment on 127.0.0.1: a TLS SuperLink that admits only registered
SuperNodes, three hospital SuperNodes with their own data, budgets and state, and a DP
run submitted with stock `flwr run`. Every command comes from the recipe in
deploy/commands.py, the same one docker/compose.yml and docs/deploy.md use."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil
import pytest

from common.flower_runtime import offline_flower_env
from common.privacy.ledger import load_public_key, read_entries, verify_chain
from deploy import commands
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from simulations.local_superlink import free_port, stop_process_tree
from tests.conftest import make_images

BIN = Path(sys.executable).parent
APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "cohort-test"
SITES = {"hospital-a": 8.0, "hospital-b": 6.0, "hospital-c": 4.0}
ROUNDS = 2
STARTUP_TIMEOUT_S = 120.0


def _local(command: list[str]) -> list[str]:
    """The recipe's `cohort`/`flwr` from this environment."""
    return [str(BIN / command[0]), *command[1:]]


@dataclass
class Deployment:
    root: Path
    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def certs(self) -> CertificateLayout:
        return CertificateLayout(self.root / "certs")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def home(self, role: str) -> Path:
        return self.root / "homes" / role

    def spawn(self, role: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Output goes to a file: a pipe held open by Flower's children would hang the test."""
        log = (self.root / "logs" / f"{role}.log").open("ab")
        process = subprocess.Popen(_local(command), env=offline_flower_env(self.home(role)), stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
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


def _wait_for_superlink(deployment: Deployment, process: subprocess.Popen[bytes]) -> None:
    context = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, deployment.log("superlink")
        try:
            if httpx.get(f"https://{deployment.address}/health", verify=context, timeout=1).is_success:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail(f"the SuperLink did not become healthy: {deployment.log('superlink')}")


def _wait_for_online(deployment: Deployment, count: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if sum(node["status"] == "online" for node in deployment.flwr_json("supernode", "list")["nodes"]) == count:
            return
        time.sleep(1)
    pytest.fail("the SuperNodes did not come online: " + " ".join(deployment.log(site) for site in SITES))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("deployment"), free_port())
    (deployment.root / "logs").mkdir()
    init_certificates(deployment.certs.root, ["localhost"])
    for site in [*SITES, "intruder"]:
        create_site_key(deployment.certs.root, site)
    _write_data(deployment.root / "data")
    try:
        superlink = deployment.spawn("superlink", commands.superlink_command(deployment.certs.root, deployment.root / "superlink.db", "127.0.0.1", deployment.port))
        _wait_for_superlink(deployment, superlink)
        connect = deployment.run("coordinator", commands.connect_command(CONNECTION, deployment.address, deployment.certs.ca_cert))
        assert connect.returncode == 0, connect.stderr
        for site in SITES:
            registered = deployment.run("coordinator", commands.register_command(deployment.certs.site_public_key(site), CONNECTION))
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for site in SITES:
            deployment.spawn(site, deployment.supernode(site, deployment.certs.site_key(site)))
        _wait_for_online(deployment, len(SITES))
        yield deployment
    finally:
        deployment.stop()
        leftovers = [p.pid for p in deployment.processes if psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE]
        assert not leftovers, f"processes left running: {leftovers}"


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


def test_supernode_whose_key_was_not_registered_is_refused(deployment: Deployment) -> None:
    intruder = deployment.spawn("intruder", deployment.supernode("intruder", deployment.certs.site_key("intruder")))
    assert intruder.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")


def test_supernode_trusting_another_ca_cannot_connect(deployment: Deployment) -> None:
    other = deployment.root / "other-ca"
    init_certificates(other, ["localhost"])
    command = [
        "flower-supernode", "--superlink", deployment.address, "--root-certificates", str(CertificateLayout(other).ca_cert),
        "--auth-supernode-private-key", str(deployment.certs.site_key("hospital-a")), "--port", str(free_port()), "--max-retries", "1",
    ]  # fmt: skip
    stranger = deployment.spawn("other-ca", command)
    assert stranger.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("other-ca")


def test_supernode_without_tls_is_refused(deployment: Deployment) -> None:
    command = ["flower-supernode", "--superlink", deployment.address, "--insecure", "--port", str(free_port()), "--max-retries", "2"]
    plain = deployment.spawn("insecure", command)
    assert plain.wait(timeout=STARTUP_TIMEOUT_S) != 0
    assert "Giving up reconnection" in deployment.log("insecure")


def test_cohort_supernode_names_the_ca_file_when_the_superlink_is_not_signed_by_it(deployment: Deployment) -> None:
    other = CertificateLayout(deployment.root / "other-ca-2")
    init_certificates(other.root, ["localhost"])
    create_site_key(other.root, "hospital-a")
    command = deployment.supernode("hospital-a", other.site_key("hospital-a"))
    command[command.index("--ca-cert") + 1] = str(other.ca_cert)
    result = deployment.run("hospital-a-wrong-ca", command)
    assert result.returncode == 2
    assert f"{other.ca_cert} does not trust" in result.stderr and "Traceback" not in result.stderr
