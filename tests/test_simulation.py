"""End to end on Flower's simulation engine: `cohort simulate` runs a real federation,
writes a complete run directory, gives the same run for the same seed, and leaves no
process behind (a run stopped from outside and resumed: tests/test_faults.py). Studies
that follow one another on one federation home run in this process
(simulations/in_process.py): what each is granted depends on the sites' ledgers alone."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from common.privacy.accounting import PrivacyState
from common.privacy.ledger import PUBLIC_KEY_FILE, LedgerRecord, RecordKind, history_of, read_entries
from common.privacy.mechanisms import Mechanism
from server.records import RoundRecord
from server.rundir import RunDirectory
from simulations.in_process import InProcessGrid, exchange_of, run_in_process
from simulations.local_superlink import command_line, free_port, stop_process_tree
from tests.conftest import flower_task_identity

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

COHORT = str(Path(sys.executable).parent / "cohort")
SMALL = ["--set", "num-sites=3", "--set", "local-epochs=1"]
SIMULATED_SITES = ("site-0", "site-1", "site-2")


def _run_dir(runs: Path) -> Path:
    (run_dir,) = list(runs.iterdir())
    return run_dir


def _metrics(run_dir: Path) -> list[RoundRecord]:
    return RunDirectory(run_dir).read_metrics()


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    runs = tmp_path_factory.mktemp("runs")
    result = subprocess.run(
        [COHORT, "simulate", *SMALL, "--set", "rounds=2", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, _run_dir(runs)


def _figures(run_dir: Path) -> list[tuple]:
    """Each round's figures but its duration: global accuracy and loss, and every site's
    epsilon, update norm, training and validation figures."""
    return [(m.round, m.accuracy, m.loss, m.sites) for m in _metrics(run_dir)]


@dataclass
class RayCluster:
    """A Ray cluster of two nodes on this machine, each started by its own `ray start
    --block` with one CPU, as `ray start` starts a cluster's head and a worker node."""

    address: str
    nodes: list[subprocess.Popen[bytes]]

    def actors_by_node(self) -> list[int]:
        """How many of the simulation's ClientApp actors each node runs now."""
        counts = []
        for node in self.nodes:
            try:
                processes = psutil.Process(node.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                processes = []
            counts.append(sum("ClientAppActor" in command_line(process) for process in processes))
        return counts


def _ray_node(*args: str) -> list[str]:
    """`ray start` of one node on 127.0.0.1, every port it binds free (another test
    session's cluster may be running on this machine)."""
    ports = {
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    return [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
        "--disable-usage-stats", *(f"{option}={port}" for option, port in ports.items()), *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_node_ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", [])
    logs = tmp_path_factory.mktemp("ray-logs")
    head = _ray_node("--head", f"--port={port}", f"--ray-client-server-port={free_port()}", "--include-dashboard=false")
    try:
        for name, command in (("head", head), ("worker", _ray_node(f"--address={cluster.address}"))):
            with (logs / f"{name}.log").open("wb") as log:
                cluster.nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            _wait_for_ray_nodes(cluster, len(cluster.nodes), logs)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            stop_process_tree(node.pid)
            node.wait()


def _wait_for_ray_nodes(cluster: RayCluster, count: int, logs: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "status", f"--address={cluster.address}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        if status.returncode == 0 and active.count(" node_") == count:
            return
        time.sleep(1)
    pytest.fail(f"the Ray cluster did not reach {count} node(s): " + " ".join(p.read_text() for p in logs.iterdir()))


@dataclass(frozen=True)
class ClusterRun:
    """A run on the two-node cluster, and the most ClientApp actors each node ran at once."""

    run_dir: Path
    busiest: list[int]


@pytest.fixture(scope="module")
def cluster_run(two_node_ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> ClusterRun:
    """completed_run's settings and seed, with `ray-address` naming the cluster: a SuperLink
    and Ray workers of its own, on two nodes of one CPU each."""
    runs = tmp_path_factory.mktemp("cluster-runs")
    command = subprocess.Popen(
        [COHORT, "simulate", *SMALL, "--set", "rounds=2", "--set", f"ray-address='{two_node_ray_cluster.address}'",
         "--runs-dir", str(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    busiest = [0, 0]
    while command.poll() is None:
        busiest = [max(seen, now) for seen, now in zip(busiest, two_node_ray_cluster.actors_by_node(), strict=True)]
        time.sleep(0.5)
    output = command.stdout.read() if command.stdout else ""
    assert command.returncode == 0, output
    return ClusterRun(_run_dir(runs), busiest)


def test_the_same_seed_gives_the_same_run_noise_included(
    completed_run: tuple[subprocess.CompletedProcess[str], Path], cluster_run: ClusterRun
) -> None:
    """The same settings and seed again, on another SuperLink, other Ray workers and other
    machines (the cluster's two nodes): every round's figures are the same."""
    _, run_dir = completed_run
    assert _figures(cluster_run.run_dir) == _figures(run_dir)
    assert RunDirectory(run_dir).read_config().noise_source == "seeded"


def test_a_run_on_a_two_node_ray_cluster_runs_one_clientapp_actor_on_each_node(
    two_node_ray_cluster: RayCluster, cluster_run: ClusterRun
) -> None:
    assert cluster_run.busiest == [1, 1], cluster_run.busiest
    recorded = json.loads((cluster_run.run_dir / "simulation.json").read_text())
    assert recorded["ray-address"] == two_node_ray_cluster.address


def test_a_run_directory_and_its_sites_state_are_private_to_the_user(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = completed_run
    shared = {PUBLIC_KEY_FILE: 0o644}  # what Cohort writes for others to read
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (run_dir, *run_dir.rglob("*"))}
    expected = {path: 0o700 if path.is_dir() else shared.get(path.name, 0o600) for path in modes}
    assert {p.relative_to(run_dir).as_posix(): oct(m) for p, m in modes.items() if m != expected[p]} == {}


def test_simulation_writes_a_complete_run_directory(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = completed_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "privacy_ledger.jsonl",
        "model.pt",
        "summary.json",
        "plots/accuracy.png",
        "plots/epsilon.png",
        "checkpoints/round-0001.pt",
        "checkpoints/round-0002.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "plots/accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_metrics_have_one_line_a_round_with_every_site(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = completed_run
    metrics = _metrics(run_dir)
    assert [m.round for m in metrics] == [1, 2]
    for record in metrics:
        assert set(record.sites) == {"site-0", "site-1", "site-2"}
        assert 0.0 <= record.accuracy <= 1.0
        assert all(0 < site.epsilon <= 8.0 for site in record.sites.values())


def _releases(ledger: Path) -> list[LedgerRecord]:
    return [e.record for e in read_entries(ledger) if e.record.kind == RecordKind.RELEASE]


def _recomputed_epsilon(releases: list[LedgerRecord]) -> float:
    return PrivacyState(1.0, 1.0, "rdp", history_of(releases)).epsilon(releases[-1].delta)


def test_run_ledger_has_one_record_per_site_per_round_that_recomputes_to_its_epsilon(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = completed_run
    records = _releases(run_dir / "privacy_ledger.jsonl")
    assert sorted((r.round, r.site) for r in records) == [(r, f"site-{s}") for r in (1, 2) for s in range(3)]
    for site in ("site-0", "site-1", "site-2"):
        mine = sorted((r for r in records if r.site == site), key=lambda r: r.round)
        assert _recomputed_epsilon(mine) == pytest.approx(mine[-1].epsilon, rel=1e-9)


def test_each_site_keeps_its_own_signed_ledger_that_verifies(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    from common.privacy.ledger import load_public_key, read_entries, verify_chain

    _, run_dir = completed_run
    for site in ("site-0", "site-1", "site-2"):
        home = run_dir / "federation" / site
        entries = read_entries(home / "privacy_ledger.jsonl")
        assert [e.record.round for e in entries] == [1, 2]
        assert verify_chain(entries, load_public_key(home / "ledger_key.pub.pem")) is None


def test_audit_of_a_run_directory_recomputes_every_sites_epsilon(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = completed_run
    result = subprocess.run(
        [COHORT, "audit", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "audit.json").read_text())
    last = _metrics(run_dir)[-1].sites
    for site in ("site-0", "site-1", "site-2"):
        assert report["sites"][site]["epsilon_total"] == pytest.approx(last[site].epsilon, rel=1e-9)
        assert report["sites"][site]["epsilon_this_run"] == pytest.approx(last[site].epsilon, rel=1e-9)
        assert report["sites"][site]["chain"] == "verified"
    assert (run_dir / "audit.html").exists()


def test_progress_and_summary_are_printed(completed_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, _ = completed_run
    assert "round   1/2" in result.stdout and "round   2/2" in result.stdout
    assert "global test accuracy" in result.stdout and "site-2" in result.stdout


def test_flowers_logs_hold_each_serverapp_line_once_and_no_colour_codes(
    completed_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = completed_run
    flower, superlink = (run_dir / "flower.log").read_text(), (run_dir / "superlink.log").read_text()
    assert "\x1b[" not in flower and "\x1b[" not in superlink
    assert flower.count("Round 1: global accuracy") == 1, flower


@dataclass(frozen=True)
class Studies:
    """Three one-round studies on one federation home, each a run of its own id."""

    home: Path
    first: InProcessGrid
    second: InProcessGrid
    third: InProcessGrid


@pytest.fixture(scope="module")
def studies_on_one_home(tmp_path_factory: pytest.TempPathFactory) -> Studies:
    """Cohort's ServerApp and the sites' own ClientApp in this process
    (simulations/in_process.py): what a study is granted depends on the sites' ledgers,
    not on Flower's transport. Simulated sites' budget is epsilon 8, all of it grantable to
    one study: the first asks 2, the second 7 (more than is left), the third all that is
    left."""
    root = tmp_path_factory.mktemp("studies")
    home = root / "federation"
    asked = {"first": 2.0, "second": 7.0, "third": 0.0}
    with flower_task_identity():
        grids = {
            name: run_in_process(
                {"rounds": 1, "study-epsilon": epsilon, "federation-home": str(home), "noise-source": "seeded"},
                3,
                root / name,
                run_id=run_id,
            )
            for run_id, (name, epsilon) in enumerate(asked.items(), start=1)
        }
    return Studies(home, **grids)


def _ledger(home: Path, site: str) -> list[LedgerRecord]:
    return [e.record for e in read_entries(home / site / "privacy_ledger.jsonl")]


def test_a_study_spends_at_most_the_epsilon_it_asked_for(studies_on_one_home: Studies) -> None:
    assert studies_on_one_home.first.stopped == ""
    for site in SIMULATED_SITES:
        release = _ledger(studies_on_one_home.home, site)[0]
        assert release.kind == RecordKind.RELEASE and release.run_id == 1
        assert release.study_epsilon == 2.0 and 1.9 < release.epsilon <= 2.0


def test_a_study_asking_more_than_is_left_is_refused_by_every_site_before_round_1(
    studies_on_one_home: Studies,
) -> None:
    second = studies_on_one_home.second
    assert second.stopped.startswith("stopped before round 1"), second.stopped
    assert all(f"site {site} refuses the study: it asks epsilon 7" in second.stopped for site in SIMULATED_SITES)
    assert {exchange_of(m) for m in second.sent} == {"query"}, "asked, then sent nothing"
    for site in SIMULATED_SITES:
        refusal = [r for r in _ledger(studies_on_one_home.home, site) if r.run_id == 2]
        assert [(r.kind, r.round, r.dataset_hash) for r in refusal] == [(RecordKind.REFUSAL, 0, "")]


def test_a_later_study_starts_from_what_the_earlier_spent_and_may_take_the_rest(studies_on_one_home: Studies) -> None:
    assert studies_on_one_home.third.stopped == ""
    for site in SIMULATED_SITES:
        first, third = [r for r in _ledger(studies_on_one_home.home, site) if r.kind == RecordKind.RELEASE]
        assert third.run_id == 3 and third.study_epsilon == pytest.approx(8.0 - first.epsilon)
        assert first.epsilon < third.epsilon <= 8.0
        assert third.epsilon == pytest.approx(_recomputed_epsilon([first, third]), rel=1e-9)


def test_a_site_whose_budget_runs_out_is_refused_and_the_run_finishes_with_the_others(tmp_path: Path) -> None:
    """In this process, like the studies above: the refusal is the site's own ClientApp
    reading its ledger, and the run going on without it is the ServerApp's."""
    from client.training import steps_per_epoch
    from server.run_config import DataConfig
    from simulations.federation import simulated_site_data

    sigma, batch = 1.5, 256
    steps = steps_per_epoch(len(simulated_site_data(DataConfig(), 1, 3).train), batch)
    one_round = PrivacyState(sigma, 1 / steps, "rdp", ((sigma, 1 / steps, steps),)).epsilon(1e-5)
    two_rounds = PrivacyState(sigma, 1 / steps, "rdp", ((sigma, 1 / steps, 2 * steps),)).epsilon(1e-5)
    home = tmp_path / "federation"
    (home / "site-1").mkdir(parents=True)
    (home / "site-1" / "policy.toml").write_text(f"epsilon = {(one_round + two_rounds) / 2}\n")

    settings = {"rounds": 3, "noise-multiplier": sigma, "federation-home": str(home), "noise-source": "seeded"}
    with flower_task_identity():
        grid = run_in_process(settings, 3, tmp_path / "run")
    assert grid.stopped == "", grid.stopped
    metrics = _metrics(tmp_path / "run")
    trained = [sorted(name for name, site in m.sites.items() if site.trained) for m in metrics]
    assert trained == [["site-0", "site-1", "site-2"], ["site-0", "site-2"], ["site-0", "site-2"]]
    assert metrics[-1].refused == ("site-1",)
    summary = RunDirectory(tmp_path / "run").read_summary()
    assert summary is not None and summary.refused == ("site-1",)
    site1 = [e.record for e in read_entries(home / "site-1" / "privacy_ledger.jsonl")]
    assert [(r.round, r.kind) for r in site1] == [(1, "release"), (2, "refusal")]
    assert "over its budget" in site1[1].reason


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """simulations/secure-aggregation.toml, small: secure aggregation and distributed DP on
    Flower's simulation engine, whose per-node context carries each site's secrets between
    the stages of a round."""
    runs = tmp_path_factory.mktemp("secure-runs")
    result = subprocess.run(
        [
            COHORT,
            "simulate",
            "simulations/secure-aggregation.toml",
            *SMALL,
            "--set",
            "rounds=2",
            "--runs-dir",
            str(runs),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return _run_dir(runs)


def test_secure_aggregation_with_distributed_dp_runs_on_the_simulation_engine_and_ledgers_each_release(
    secure_run: Path,
) -> None:
    metrics = _metrics(secure_run)
    assert [m.round for m in metrics] == [1, 2] and all(
        m.client_level is not None and m.client_level.released for m in metrics
    )
    assert all(sum(site.trained for site in m.sites.values()) == 3 for m in metrics)
    releases = [e.record for e in read_entries(secure_run / "server" / "privacy_ledger.jsonl")]
    assert [(r.kind, r.mechanism, json.loads(r.mechanism_details)["sites"]) for r in releases] == [
        (RecordKind.RELEASE, Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM, [f"site-{i}" for i in range(3)])
    ] * 2
    assert 0 < releases[-1].epsilon <= 8.0 and releases[-1].epsilon == metrics[-1].client_level.epsilon
