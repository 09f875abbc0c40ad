"""Hostile and failing sites, and a command stopped or killed from outside, with real processes:
`cohort simulate` on Flower's simulation engine, attacks from simulations/attacks.py."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from client.site_data import simulated_site_data as read_site_data
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import LEDGER_FILE, LedgerEntry, history_of, load_public_key, read_entries, verify_chain
from server.records import RoundRecord, Summary
from server.rundir import RunDirectory
from simulations.federation import simulated_site_data
from simulations.in_process import run_in_process
from simulations.local_superlink import command_line
from tests.conftest import federation_processes, flower_task_identity

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

COHORT = str(Path(sys.executable).parent / "cohort")
ROUNDS = 4
NO_DP_CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "no-dp.toml"
HOSTILE_FEDERATION_SITES = 5
NO_DP = [
    str(NO_DP_CONFIG),
    "--set",
    f"num-sites={HOSTILE_FEDERATION_SITES}",
    "--set",
    f"rounds={ROUNDS}",
]
ENV = {**os.environ, "COLUMNS": "200"}
# The default federation, small: DP at three sites, one local epoch a round.
SMALL_DP = ["--set", "num-sites=3", "--set", "local-epochs=1"]
SITES = ("site-0", "site-1", "site-2")
RESUMED_ROUNDS = 4


def _simulate(runs: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    result = subprocess.run(
        [COHORT, "simulate", *args, "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        check=False,
    )
    (run_dir,) = list(runs.iterdir())
    return result, run_dir


def _resume(run_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COHORT, "simulate", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


def _metrics(run_dir: Path) -> list[RoundRecord]:
    return RunDirectory(run_dir).read_metrics()


def _summary(run_dir: Path) -> Summary:
    summary = RunDirectory(run_dir).read_summary()
    assert summary is not None, f"{run_dir} has no summary.json"
    return summary


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The hostile run's federation with every site honest, run in this process
    (simulations/in_process.py: the same ServerApp, ClientApp, data and seed): the accuracy
    it reaches is a fact of the model and the data, which Flower's transport does not change."""
    settings = {**tomllib.loads(NO_DP_CONFIG.read_text()), "rounds": ROUNDS}
    del settings["num-sites"]  # a simulation setting; run_in_process takes the sites itself
    run_dir = tmp_path_factory.mktemp("clean")
    with flower_task_identity():
        clean = run_in_process(settings, HOSTILE_FEDERATION_SITES, run_dir)
    assert clean.stopped == "", clean.stopped
    accuracy = _summary(run_dir).final_accuracy
    assert accuracy is not None
    return accuracy


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    return _simulate(
        tmp_path_factory.mktemp("hostile"), *NO_DP, "--set", 'attack=["nan", "boost"]', "--set", "attack-sites=[1, 2]"
    )


def test_a_run_with_a_nan_site_and_a_boosting_site_completes_near_the_clean_accuracy(
    clean_accuracy: float, hostile_run: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    hostile, hostile_dir = hostile_run
    assert hostile.returncode == 0, hostile.stdout + hostile.stderr
    hostile_accuracy = _summary(hostile_dir).final_accuracy
    assert hostile_accuracy >= clean_accuracy - 0.1, (clean_accuracy, hostile_accuracy)


def test_every_round_names_both_hostile_sites_with_their_reasons(hostile_run) -> None:  # type: ignore[no-untyped-def]
    _, run_dir = hostile_run
    for record in _metrics(run_dir):
        reasons = {r.site: r.reason for r in record.rejected}
        assert set(reasons) == {"site-1", "site-2"}
        assert "NaN" in reasons["site-1"] and "above the bound" in reasons["site-2"]
        assert not record.sites["site-1"].trained and record.sites["site-0"].trained


def test_summary_progress_line_and_audit_name_the_rejected_sites(hostile_run) -> None:  # type: ignore[no-untyped-def]
    result, run_dir = hostile_run
    summary = _summary(run_dir)
    assert summary.rejected["site-1"].count == ROUNDS and summary.rejected["site-2"].rounds == tuple(
        range(1, ROUNDS + 1)
    )
    assert "rejected: site-1, site-2" in result.stdout
    audit = subprocess.run(
        [COHORT, "audit", str(run_dir)], capture_output=True, text=True, timeout=300, env=ENV, check=False
    )
    assert audit.returncode == 0, audit.stderr
    assert f"rejected: site-1: {ROUNDS} reply(ies)" in audit.stdout and "NaN" in audit.stdout


def test_the_rejected_sites_spend_is_still_in_the_runs_ledger(hostile_run) -> None:  # type: ignore[no-untyped-def]
    _, run_dir = hostile_run
    records = [e.record for e in read_entries(run_dir / "privacy_ledger.jsonl")]
    assert sorted((r.round, r.site) for r in records) == [
        (n, f"site-{s}") for n in range(1, ROUNDS + 1) for s in range(5)
    ]


SILENT_TIMEOUT = 60  # round 1 also starts Ray and loads the data at every site


@pytest.fixture(scope="module")
def silent_and_poisoning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One round of 3 sites: site 1 flips its labels, site 2 never answers."""
    return _simulate(
        tmp_path_factory.mktemp("silent"),
        *NO_DP[:1],
        "--set", "num-sites=3", "--set", "rounds=1", "--set", f"reply-timeout={SILENT_TIMEOUT}",
        "--set", 'attack=["label-flip", "silent"]', "--set", "attack-sites=[1, 2]",
    )  # fmt: skip


def test_a_silent_site_fails_its_round_after_the_timeout_and_the_round_finishes(silent_and_poisoning_run) -> None:  # type: ignore[no-untyped-def]
    result, run_dir = silent_and_poisoning_run
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = _metrics(run_dir)
    assert [(f.site, f.stage) for f in record.failures] == [(f"node {record.failures[0].node}", "train")]
    assert all(f"no reply within {SILENT_TIMEOUT}s" in f.reason for f in record.failures)
    assert sorted(name for name, site in record.sites.items() if site.trained) == ["site-0", "site-1"]
    assert record.seconds >= SILENT_TIMEOUT


def test_a_label_flipping_site_trains_on_the_share_the_runner_poisoned(silent_and_poisoning_run) -> None:  # type: ignore[no-untyped-def]
    _, run_dir = silent_and_poisoning_run
    (entry,) = [e for e in read_entries(run_dir / "privacy_ledger.jsonl") if e.record.site == "site-1"]
    honest = simulated_site_data(RunDirectory(run_dir).read_config().data, 1, 3)
    poisoned = read_site_data(str(run_dir), 1)
    assert entry.record.dataset_hash == poisoned.identity != honest.identity
    np.testing.assert_array_equal(
        np.concatenate([poisoned.train.labels, poisoned.val.labels]),
        9 - np.concatenate([honest.train.labels, honest.val.labels]),
    )


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_when(command: subprocess.Popen[str], signum: int, ready: Callable[[], bool]) -> None:
    """Send `signum` once `ready()` holds; the command must exit with 128 + signum, leaving
    none of the processes it started running."""
    started: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    while True:
        for process in _descendants(command.pid):
            started.setdefault(process.pid, process)
        if ready() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert command.poll() is None, command.stderr.read() if command.stderr else ""
    assert any("flwr-simulation" in command_line(p) for p in started.values()), "the run had not started"
    command.send_signal(signum)
    _, stderr = command.communicate(timeout=120)
    assert command.returncode == 128 + signum, stderr
    time.sleep(1)
    alive = [p for p in started.values() if _alive(p)]
    assert not alive, [command_line(p) for p in alive]


# SIGINT (Ctrl-C) is sent by the resumed run below, which checks the same.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_exactly_the_processes_the_command_started(signum: int, tmp_path: Path) -> None:
    command = subprocess.Popen(
        [COHORT, "simulate", *NO_DP[:1], "--set", "num-sites=3", "--set", "rounds=50", "--runs-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    _stop_when(command, signum, lambda: any("ray::" in command_line(p) for p in _descendants(command.pid)))


def _ledger_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@dataclass(frozen=True)
class ResumedRun:
    """A DP run stopped with Ctrl-C once its second round was checkpointed (a round takes
    about a second here, so a later one is under way), then resumed with `cohort simulate
    --resume`. Before the resume: how many rounds it had recorded, whether it had written
    a summary, and each site's ledger lines."""

    run_dir: Path
    rounds_before: int
    summary_before: bool
    ledgers_before: dict[str, list[str]]
    resumed: subprocess.CompletedProcess[str]

    def site_ledger(self, site: str) -> Path:
        return self.run_dir / "federation" / site / LEDGER_FILE


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> ResumedRun:
    runs = tmp_path_factory.mktemp("interrupted")
    command = subprocess.Popen(
        [COHORT, "simulate", *SMALL_DP, "--set", f"rounds={RESUMED_ROUNDS}", "--runs-dir", str(runs)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    _stop_when(command, signal.SIGINT, lambda: bool(list(runs.glob("*/checkpoints/round-0002.pt"))))
    (run_dir,) = list(runs.iterdir())
    return ResumedRun(
        run_dir,
        len(_metrics(run_dir)),
        (run_dir / "summary.json").exists(),
        {site: _ledger_lines(run_dir / "federation" / site / LEDGER_FILE) for site in SITES},
        _resume(run_dir, timeout=600),
    )


def test_ctrl_c_stops_a_run_before_its_end_without_a_summary(resumed_run: ResumedRun) -> None:
    assert resumed_run.rounds_before < RESUMED_ROUNDS and not resumed_run.summary_before


def test_a_resumed_run_continues_at_the_next_round_with_each_sites_epsilon_continuing(
    resumed_run: ResumedRun,
) -> None:
    resumed = resumed_run.resumed
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    metrics = _metrics(resumed_run.run_dir)
    assert [m.round for m in metrics] == list(range(1, RESUMED_ROUNDS + 1))
    for site in SITES:
        epsilons = [m.sites[site].epsilon for m in metrics]
        assert all(a < b for a, b in itertools.pairwise(epsilons)) and epsilons[-1] <= 8.0
    # The site's own ledger holds every release, including one made in the round that was
    # interrupted; the reported epsilon composes all of them.
    releases = [e.record for e in read_entries(resumed_run.site_ledger("site-0")) if e.record.kind == "release"]
    recomputed = PrivacyState(1.0, 1.0, "rdp", history_of(releases)).epsilon(releases[-1].delta)
    assert releases[-1].epsilon == pytest.approx(recomputed, rel=1e-9)
    assert metrics[-1].sites["site-0"].epsilon == pytest.approx(releases[-1].epsilon, rel=1e-9)


def test_every_release_made_before_the_stop_is_in_the_ledgers_once_after_the_resume(resumed_run: ResumedRun) -> None:
    copies = [LedgerEntry.from_json(line) for line in _ledger_lines(resumed_run.run_dir / LEDGER_FILE)]
    for site in SITES:
        ledger = resumed_run.site_ledger(site)
        after = _ledger_lines(ledger)
        before = resumed_run.ledgers_before[site]
        assert after[: len(before)] == before, "a release the site made before the stop was lost"
        entries = read_entries(ledger)
        assert verify_chain(entries, load_public_key(ledger.parent / "ledger_key.pub.pem")) is None
        mine = [e for e in copies if e.record.site == site]
        assert len({e.sequence for e in mine}) == len(mine), "the run's ledger holds a release twice"
        assert {e.entry_hash() for e in mine} <= {e.entry_hash() for e in entries}
        assert sorted(e.record.round for e in mine) == list(range(1, RESUMED_ROUNDS + 1))


@dataclass(frozen=True)
class KilledRun:
    """A run whose `cohort simulate` was SIGKILLed with its process group mid-run, and what
    two more commands on its run directory said while it ran."""

    run_dir: Path
    pid: int
    second_writers: list[subprocess.CompletedProcess[str]]
    rounds_at_kill: int
    seconds_until_none_left: float
    left_running: list[str]


def _wait_for(command: subprocess.Popen[bytes], runs: Path, pattern: str) -> None:
    deadline = time.monotonic() + 300
    while not list(runs.glob(pattern)):
        assert command.poll() is None and time.monotonic() < deadline, f"the run wrote no {pattern}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> KilledRun:
    runs = tmp_path_factory.mktemp("killed")
    before = federation_processes()
    # Its own process group, as a batch scheduler or a shell job would run it.
    command = subprocess.Popen(
        [COHORT, "simulate", NO_DP[0], "--set", "num-sites=3", "--set", "rounds=500", "--runs-dir", str(runs)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True,
    )  # fmt: skip
    _wait_for(command, runs, "*/config.json")  # the ServerApp has started writing
    (run_dir,) = list(runs.iterdir())
    second_writers = [
        _resume(run_dir, timeout=300),
        subprocess.run(
            [COHORT, "simulate", NO_DP[0], "--set", "num-sites=3", "--set", f"run-dir={run_dir}"],
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
            check=False,
        ),
    ]
    _wait_for(command, runs, "*/checkpoints/round-0001.pt")  # the sites are training
    assert command.poll() is None and not (run_dir / "summary.json").exists(), "the run ended before it was killed"
    os.killpg(command.pid, signal.SIGKILL)  # as the OOM killer or a scheduler would: no handler runs
    command.wait()
    killed_at = time.monotonic()
    rounds_at_kill = len(_metrics(run_dir))
    while federation_processes() - before and time.monotonic() - killed_at < 60:
        time.sleep(0.2)
    left = [command_line(psutil.Process(pid)) for pid in federation_processes() - before if psutil.pid_exists(pid)]
    return KilledRun(run_dir, command.pid, second_writers, rounds_at_kill, time.monotonic() - killed_at, left)


def test_a_second_writer_on_a_running_run_directory_is_refused_naming_the_holder(killed_run: KilledRun) -> None:
    for refused in killed_run.second_writers:
        assert refused.returncode == 2, refused.stdout + refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(
            f"error: run directory {killed_run.run_dir} is in use by cohort simulate (pid {killed_run.pid}, since "
        )
        assert refused.stdout == ""


def test_every_process_a_sigkilled_simulation_started_stops_within_a_minute(killed_run: KilledRun) -> None:
    assert not killed_run.left_running, killed_run.left_running
    assert killed_run.seconds_until_none_left < 60


def test_a_sigkilled_simulation_trains_no_further_round(killed_run: KilledRun) -> None:
    time.sleep(2)
    assert len(_metrics(killed_run.run_dir)) <= killed_run.rounds_at_kill + 1  # at most the round under way
    assert not (killed_run.run_dir / "summary.json").exists()
