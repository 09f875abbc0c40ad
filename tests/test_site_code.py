"""A hostile coordinator against real sites: a real SuperLink and two SuperNodes on
127.0.0.1, started the way `cohort supernode` starts them (the site's own key, its own
`flwr-clientapp` first on PATH), and runs submitted with stock `flwr run`.

The SuperLink runs without TLS here: these tests are about what a site does with what it
is sent; TLS and SuperNode authentication are tested in tests/test_deployment.py.
Tests run in file order and share one federation: each run builds on the ledger that the
runs before it left.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from common.config import SiteRunConfig
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import (
    LEDGER_FILE,
    LedgerEntry,
    RecordKind,
    history_of,
    load_public_key,
    read_entries,
    verify_chain,
)
from deploy.clientapp_forkserver import wait_until_serving
from deploy.flower_runtime import app_folder, offline_flower_env
from deploy.launch import FORKSERVER_STARTUP_S, SuperNodeLaunch, flower_env, forkserver_argv, install_site_runner
from server.records import SiteRound
from server.rundir import RunDirectory
from simulations.local_superlink import free_port, stop_process_tree
from tests.conftest import make_images

BIN = Path(sys.executable).parent
CONNECTION = "site-test"
SITES = {"hospital-a": 2.0, "hospital-b": 8.0}
DELTA = 1e-5
STARTUP_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
# What every run of this module shares: tiny, one local epoch, and the run goes on while
# any site still trains.
BASE_RUN_CONFIG = "min-sites=1 batch-size=32 local-epochs=1 rounds=1"


@dataclass
class Federation:
    root: Path
    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def state(self, site: str) -> Path:
        return self.root / "state" / site

    def entries(self, site: str) -> list[LedgerEntry]:
        return read_entries(self.state(site) / LEDGER_FILE)

    def log(self, role: str) -> str:
        return (self.root / "logs" / f"{role}.log").read_text(errors="replace")

    def spawn(self, role: str, argv: list[str], env: dict[str, str]) -> None:
        """Output goes to a file: a pipe held open by Flower's children would hang the test."""
        log = (self.root / "logs" / f"{role}.log").open("ab")
        self.processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root))

    def coordinator(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        env = offline_flower_env(self.root / "homes" / "coordinator")
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            check=False,
        )

    def run(self, app_dir: Path, run_config: str, name: str) -> dict:
        """Submit a run, wait for it to end, and return Flower's record of it."""
        run_dir = self.root / "runs" / name
        config = (
            f"{BASE_RUN_CONFIG} dataset='{self.root / 'data' / 'coordinator.npz'}' run-dir='{run_dir}' {run_config}"
        )
        result = self.coordinator("run", str(app_dir), CONNECTION, "--run-config", config, "--stream")
        started = re.search(r"Successfully started run (\d+)", result.stdout)
        assert result.returncode == 0 and started, result.stdout + result.stderr
        listed = self.coordinator("list", "--run-id", started.group(1), CONNECTION, "--format", "json")
        (run,) = json.loads(listed.stdout)["runs"]
        run["metrics"] = RunDirectory(run_dir).read_metrics()
        return run

    def stop(self) -> None:
        for process in self.processes:
            stop_process_tree(process.pid)
            process.wait()


def _write_connection(home: Path, port: int) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )


def _wait_for(condition, what: str, federation: Federation) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: " + " ".join(federation.log(role) for role in ["superlink", *SITES]))


def _online_sites(federation: Federation) -> int:
    listed = federation.coordinator("supernode", "list", CONNECTION, "--format", "json", timeout=60)
    return sum(node["status"] == "online" for node in json.loads(listed.stdout)["nodes"])


def _start_site(federation: Federation, site: str) -> None:
    """What `cohort supernode` does, on an insecure SuperLink: prepare the site's own
    runtime, start its ClientApp fork server, then flower-supernode with the site's folder
    first on PATH."""
    data = federation.root / "data" / f"{site}.npz"
    launch = SuperNodeLaunch(
        superlink=f"127.0.0.1:{federation.port}", ca_cert=Path("unused"), auth_key=Path("unused"), name=site,
        data=data, state_dir=federation.state(site), epsilon=SITES[site], delta=DELTA, port=free_port(),
    )  # fmt: skip
    launch.prepare()
    sockets = federation.root / "sockets" / site
    sockets.mkdir(parents=True, mode=0o700)
    env = flower_env(install_site_runner(launch.state_dir, sockets))
    env["FLWR_HOME"] = str(federation.root / "homes" / site)
    federation.spawn(f"{site}-clientapps", forkserver_argv(sockets), env)
    server = federation.processes[-1]
    assert wait_until_serving(sockets, lambda: server.poll() is None, FORKSERVER_STARTUP_S), federation.log(
        f"{site}-clientapps"
    )
    argv = [
        str(BIN / "flower-supernode"), "--insecure", "--superlink", launch.superlink, "--port", str(launch.port),
        "--isolation", "subprocess", "--node-config", launch.node_config(),
    ]  # fmt: skip
    federation.spawn(site, argv, env)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    federation = Federation(tmp_path_factory.mktemp("sites"), free_port())
    for folder in ("logs", "data", "state", "runs"):
        (federation.root / folder).mkdir()
    for seed, name in enumerate([*SITES, "coordinator"]):
        images, labels = make_images(160, seed=seed + 20)
        np.savez(federation.root / "data" / f"{name}.npz", train_images=images, train_labels=labels[:, None])
    _write_connection(federation.root / "homes" / "coordinator", federation.port)
    try:
        superlink = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(federation.port)]
        federation.spawn("superlink", superlink, offline_flower_env(federation.root / "homes" / "superlink"))
        _wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{federation.port}/health", timeout=1).is_success,
            "the SuperLink did not start",
            federation,
        )
        for site in SITES:
            _start_site(federation, site)
        _wait_for(lambda: _online_sites(federation) == len(SITES), "the SuperNodes did not come online", federation)
        yield federation
    finally:
        federation.stop()
        leftovers = [
            p.pid
            for p in federation.processes
            if psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE
        ]
        assert not leftovers, f"processes left running: {leftovers}"


def _edit(path: Path, changes: tuple[tuple[str, str], ...]) -> None:
    code = path.read_text()
    for old, new in changes:
        assert old in code, f"{path} no longer holds {old!r}"
        code = code.replace(old, new)
    path.write_text(code)


def _hostile_app(root: Path) -> Path:
    """A copy of the Cohort app whose ClientApp skips the budget check and trains with no
    noise at all, even where the site's policy forbids it."""
    app = app_folder(root / "hostile-app")
    skipped = (
        ("    if not run.dp.sample_level and not site.allow_non_private:", "    if False:"),
        (
            (
                "    privacy = _planned_privacy(run, site, spender, entries, len(data.train))"
                " if run.dp.sample_level else None\n"
            ),
            "    privacy = None\n",
        ),
    )
    _edit(app / "client" / "app.py", skipped)
    return app


def _newer_coordinator_app(root: Path) -> Path:
    """A copy of the Cohort app one coordinator version ahead of the sites: a changed
    server/ file and a run-config setting the sites' installed version does not know, and
    the sites' own site package (client/ and common/)."""
    app = app_folder(root / "newer-coordinator-app")
    margin = '    fairness_margin: float = number(0.05, 0, 1, note="an accuracy gap")\n'
    _edit(app / "server" / "run_config.py", ((margin, margin + '    coordinator_note: str = ""\n'),))
    _edit(app / "pyproject.toml", (("fairness-margin = 0.05\n", 'fairness-margin = 0.05\ncoordinator-note = ""\n'),))
    return app


@pytest.fixture(scope="module")
def honest_run(federation: Federation) -> dict:
    """The first run the sites answer, submitted by a coordinator one version ahead of them."""
    return federation.run(
        _newer_coordinator_app(federation.root), "accountant='gdp' seed=1 coordinator-note='newer'", "honest"
    )


def _sites_reported(run: dict) -> list[SiteRound]:
    return [site for record in run["metrics"] for site in record.sites.values()]


def test_a_fab_whose_clientapp_skips_the_budget_check_is_refused_and_recorded(federation: Federation) -> None:
    run = federation.run(_hostile_app(federation.root), "noise-multiplier=0", "hostile")
    assert not _sites_reported(run), "an update from the hostile code reached the coordinator"
    for site in SITES:
        entries = federation.entries(site)
        assert entries and {e.record.kind for e in entries} == {RecordKind.REFUSAL}, entries
        assert all(
            "refuses to run this run's code" in e.record.reason and "client/app.py" in e.record.reason for e in entries
        )
        assert all(e.record.config_hash.startswith("fab:") for e in entries)
        assert "refused run" in federation.log(site)


def test_the_sites_own_code_trains_with_the_sites_accountant_whatever_the_run_config_names(
    federation: Federation, honest_run: dict
) -> None:
    run = honest_run
    assert run["status"] == "finished:completed", run
    for site, budget in SITES.items():
        releases = [e.record for e in federation.entries(site) if e.record.kind == RecordKind.RELEASE]
        assert [r.round for r in releases] == [1]
        assert {r.accountant for r in releases} == {"rdp"}
        rdp = PrivacyState(1.0, 1.0, "rdp", history_of(releases)).epsilon(DELTA)
        assert releases[-1].epsilon == pytest.approx(rdp) and rdp <= budget


def test_a_site_answers_a_coordinator_whose_own_code_and_settings_are_newer_than_its_own(
    federation: Federation, honest_run: dict
) -> None:
    """docs/site.md, "Versions": a site ignores run-config keys it does not read, and signs
    the fingerprint of those it does, which the newer coordinator computes alike."""
    assert honest_run["status"] == "finished:completed", honest_run
    assert {name for record in honest_run["metrics"] for name, site in record.sites.items() if site.trained} == set(
        SITES
    )
    settings = json.loads((federation.root / "runs" / "honest" / "config.json").read_text())["run_config"]
    assert settings["coordinator-note"] == "newer"
    for site in SITES:
        last = federation.entries(site)[-1].record
        assert (
            last.kind == RecordKind.RELEASE
            and last.config_hash == SiteRunConfig.from_flower(settings).site_fingerprint()
        )


def test_with_the_default_policy_the_coordinator_receives_no_per_site_training_or_validation_metrics(
    federation: Federation,
) -> None:
    run_dir = federation.root / "runs" / "honest"
    reported = [site for record in RunDirectory(run_dir).read_metrics() for site in record.sites.values()]
    assert reported, "no site took part in the honest run"
    for site in reported:
        assert site.train_loss is None and site.train_accuracy is None
        assert site.val_loss is None and site.val_accuracy is None
        assert site.num_examples > 0 and site.epsilon > 0


def test_another_seed_and_validation_share_continue_the_same_budget(federation: Federation) -> None:
    """The site's refusal counts from what its dataset spent before, whichever bound (its
    budget, or the study's grant from it) the round would cross."""
    federation.run(app_folder(federation.root / "app-again"), "seed=43 val-fraction=0.3 noise-multiplier=1.0", "again")
    for site in SITES:
        *earlier, last = federation.entries(site)
        spent = [e.record.epsilon for e in earlier if e.record.kind == RecordKind.RELEASE][-1]
        assert last.record.kind == RecordKind.REFUSAL, last.record
        assert f"this round would raise its epsilon from {spent:.3f}" in last.record.reason, last.record.reason


def test_the_run_config_cannot_turn_dp_off_nor_move_the_ledger_and_a_truncated_ledger_stops_training(
    federation: Federation, tmp_path: Path
) -> None:
    """One run, two attacks: hospital-a is asked to train without DP; hospital-b's ledger
    lost its last record (with a full budget the easy way back)."""
    ledger_b = federation.state("hospital-b") / LEDGER_FILE
    lines = ledger_b.read_text().splitlines(keepends=True)
    ledger_b.write_text("".join(lines[:-1]))
    elsewhere = tmp_path / "elsewhere"
    before = len(federation.entries("hospital-a"))
    run = federation.run(
        app_folder(tmp_path / "app"), f"dp=false site-allow-non-private=true federation-home='{elsewhere}'", "no-dp"
    )
    assert not _sites_reported(run)
    assert not elsewhere.exists()
    entries = federation.entries("hospital-a")
    assert [e.record.kind for e in entries[before:]] == [RecordKind.REFUSAL]
    assert "refuses to train without differential privacy" in entries[-1].record.reason
    assert not any(e.record.kind == RecordKind.NON_PRIVATE for e in entries)
    assert len(federation.entries("hospital-b")) == len(lines) - 1
    operator_lines = [
        line for line in federation.log("hospital-b").splitlines() if "refuses to train until its operator" in line
    ]
    assert len(operator_lines) == 1 and "records were removed from its end" in operator_lines[0]


def test_audit_shows_every_dataset_a_site_spent_on_and_its_chain_verifies(federation: Federation) -> None:
    state = federation.state("hospital-a")
    assert verify_chain(federation.entries("hospital-a"), load_public_key(state / "ledger_key.pub.pem")) is None
    out = federation.root / "audit-hospital-a"
    result = subprocess.run(
        [str(BIN / "cohort"), "audit", str(state), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=federation.root,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "audit.json").read_text()) if (out / "audit.json").exists() else None
    identities = {
        e.record.dataset_hash for e in federation.entries("hospital-a") if e.record.kind == RecordKind.RELEASE
    }
    assert report is not None and set(report["sites"]["hospital-a"]["datasets"]) == identities
