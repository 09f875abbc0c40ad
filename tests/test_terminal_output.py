"""What every `cohort` command prints reads whole in an 80-column terminal or CI log: no
line over 80 columns but a long path or command, kept whole on a line of its own, and
no colour codes where no terminal reads it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from cli.rounds import round_line
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import LedgerRecord, Noise, SiteLedger, Spender
from common.privacy.mechanisms import Mechanism
from server.records import CentralRelease, Failure, Rejection, RoundRecord, SiteRound
from server.run_config import DataConfig, RunConfig
from server.rundir import RunDirectory

COHORT = str(Path(sys.executable).parent / "cohort")
COLUMNS = 80
# A line a shell command is printed on (cohort certs prints them to paste), or a
# `command` quoted in a message: kept whole whatever its length.
COMMAND_LINE = re.compile(r"^(cohort |flwr |--|`[^`]+`[.;,]?$)")
# Paths as long as a hospital's tend to be.
LONG_FOLDER = Path("a-folder-with-a-rather-long-name") / "and-another-one-inside-it-to-make-paths-long"


def _record(**extra: object) -> RoundRecord:
    sites = {f"site-{i}": SiteRound(trained=True, epsilon=7.95) for i in range(5)}
    return RoundRecord(round=50, accuracy=0.9361, loss=0.2113, sites=sites, seconds=123.4, **extra)  # type: ignore[arg-type]


def test_a_round_line_fits_80_columns() -> None:
    line = round_line(_record(), rounds=100)
    assert len(line) <= 80 and "\n" not in line
    assert line.startswith("round  50/100  acc 0.936") and line.endswith("123.4s")


def test_client_level_rounds_say_whose_epsilon_it_is() -> None:
    line = round_line(_record(client_level=CentralRelease(released=False, epsilon=3.2)), rounds=10)
    assert "client eps 3.20 held" in line and len(line) <= 80


def test_problems_go_on_their_own_lines() -> None:
    record = _record(
        failures=(Failure(3, "site-3", "train", "no reply within 600s"),),
        rejected=(Rejection(1, "site-1", "train", "NaN"), Rejection(2, "site-2", "train", "NaN")),
        refused=("site-4",),
    )
    first, *problems = round_line(record, rounds=50).splitlines()
    assert len(first) <= 80
    assert [p.strip() for p in problems] == ["failed: site-3", "rejected: site-1, site-2", "refused: site-4"]


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of `cohort`, the hidden ones included."""
    paths = [path]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            paths += _command_paths(sub, (*path, name))
    return paths


HELP = {
    " ".join(("cohort", *path, "--help")): [*path, "--help"] for path in _command_paths(typer.main.get_command(app))
}


def _ledger(state_dir: Path) -> Path:
    """A site's ledger of two DP releases and a round without DP, near its budget: the
    audit prints its tables and its warnings."""
    ledger = SiteLedger(state_dir, create_key=True)
    spent = PrivacyState(1.2, 0.25, "rdp", ((1.2, 0.25, 8),)).epsilon(1e-5)
    for round_, steps in ((1, 4), (2, 8)):
        spender = Spender(1, round_, "hospital-with-a-long-name", 1e-5, round(spent * 1.05, 2), "d", "c")
        ledger.append(
            LedgerRecord.release(
                spender, Mechanism.SAMPLE_LEVEL_DP_SGD, Noise(1.2, 0.25, steps=steps, clip_norm=1.0), spent, "rdp", "m"
            )
        )
    spender = Spender(1, 3, "hospital-with-a-long-name", 1e-5, round(spent * 1.05, 2), "d", "c")
    ledger.append(LedgerRecord.non_private(spender, Mechanism.NONE, 0, 1.0, "rdp", "m"))
    return state_dir


def _run_dir(path: Path, data: DataConfig) -> Path:
    RunDirectory(path).prepare(RunConfig(data=data))
    return path


def _cheap_commands(root: Path) -> dict[str, list[str]]:
    """The commands that run in a second or two, on files _prepare makes under root: what
    the coordinator and a site print, and the mistakes they are told of."""
    deep = root / LONG_FOLDER
    ledger = deep / "state" / "hospital-a"
    run_a, run_b = deep / "runs" / "a", deep / "runs" / "b"
    return {
        "certs init": [
            "certs",
            "init",
            str(deep / "certs"),
            "--superlink-host",
            "coordinator.hospital-net.example",
            "--ca-passphrase-file",
            str(root / "passphrase"),
        ],
        "certs site": ["certs", "site", str(deep / "site-certs"), "hospital-a"],
        "site init": ["site", "init", "--state-dir", str(deep / "state" / "hospital-b")],
        "audit": ["audit", str(ledger), "--out", str(root / "audit")],
        "audit verify": ["audit", "verify", str(ledger), "--public-key", str(ledger / "ledger_key.pub.pem")],
        "compare, runs of other data": ["compare", str(run_a), str(run_b)],
        "compare, no run": ["compare", str(deep), str(run_b)],
        "simulate, unknown setting": ["simulate", "--set", "round=3", "--runs-dir", str(root / "runs")],
        "simulate, bad value": ["simulate", "--set", "model=resnet", "--runs-dir", str(root / "runs")],
        "simulate, missing config": ["simulate", str(deep / "study.toml"), "--runs-dir", str(root / "runs")],
        "simulate, resume with settings": ["simulate", "--resume", str(run_a), "--set", "rounds=3"],
        "run, unknown setting": ["run", "hospitals", "--set", "min-site=2"],
        "run, no connection": ["run", "hospitals", "--set", "rounds=2"],
        "service superlink": [
            "service",
            "superlink",
            str(root / "cohort-superlink.service"),
            "--user",
            "cohort-coordinator",
            "--certs",
            str(deep / "certs"),
            "--database",
            str(deep / "superlink.db"),
            "--runs-dir",
            str(deep / "runs"),
        ],
        "service supernode": [
            "service",
            "supernode",
            str(root / "cohort-hospital-a.service"),
            "--user",
            "cohort-hospital-a",
            "--superlink",
            "coordinator.hospital-net.example:8000",
            "--ca-cert",
            str(deep / "ca.crt"),
            "--auth-key",
            str(deep / "hospital-a.key"),
            "--name",
            "hospital-a",
            "--data",
            str(deep / "hospital-a.npz"),
            "--state-dir",
            str(deep / "state" / "hospital-a"),
            "--epsilon",
            "8",
            "--delta",
            "1e-5",
        ],
        "supernode, missing data": [
            "supernode",
            "--superlink",
            "coordinator.hospital-net.example:8000",
            "--ca-cert",
            str(deep / "ca.crt"),
            "--auth-key",
            str(deep / "hospital-a.key"),
            "--name",
            "hospital-a",
            "--data",
            str(deep / "hospital-a.npz"),
            "--state-dir",
            str(deep / "state" / "hospital-a"),
            "--epsilon",
            "8",
            "--delta",
            "1e-5",
        ],
    }


CHEAP = list(_cheap_commands(Path("/root")))


def _prepare(root: Path) -> None:
    (root / "passphrase").write_text("the coordinator's passphrase\n")
    _ledger(root / LONG_FOLDER / "state" / "hospital-a")
    _run_dir(root / LONG_FOLDER / "runs" / "a", DataConfig())
    _run_dir(root / LONG_FOLDER / "runs" / "b", DataConfig(seed=7))


def _cohort(args: list[str], home: Path) -> str:
    env = {**os.environ, "COLUMNS": str(COLUMNS), "FLWR_HOME": str(home)}
    result = subprocess.run(
        [COHORT, *args], capture_output=True, text=True, timeout=300, env=env, cwd=home.parent, check=False
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What each command printed at COLUMNS=80: the cheap commands run a few at a time, the
    help pages in this process (Typer's test runner prints them byte for byte as `cohort`
    does, without paying the command's start 28 times)."""
    root = tmp_path_factory.mktemp("terminal")
    home = root / "flwr-home"
    home.mkdir()
    _prepare(root)
    commands = _cheap_commands(root)
    with ThreadPoolExecutor(max_workers=4) as pool:
        printed = pool.map(lambda args: _cohort(args, home), commands.values())
    runner = CliRunner()
    help_pages = {
        name: runner.invoke(app, args, env={"COLUMNS": str(COLUMNS)}, prog_name="cohort").output
        for name, args in HELP.items()
    }
    return {**dict(zip(commands, printed, strict=True)), **help_pages}


def _too_wide(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > COLUMNS and not _whole_path_or_command(line.strip())]


def _whole_path_or_command(line: str) -> bool:
    return " " not in line.removesuffix(" \\") or bool(COMMAND_LINE.match(line))


@pytest.mark.parametrize("command", list(HELP))
def test_every_help_fits_80_columns(outputs: dict[str, str], command: str) -> None:
    assert "Usage:" in outputs[command], outputs[command]
    assert _too_wide(outputs[command]) == [], outputs[command]


@pytest.mark.parametrize("command", CHEAP)
def test_what_a_command_prints_fits_80_columns(outputs: dict[str, str], command: str) -> None:
    assert outputs[command].strip(), command
    assert _too_wide(outputs[command]) == [], outputs[command]


def test_nothing_printed_to_a_pipe_is_coloured(outputs: dict[str, str]) -> None:
    assert [command for command, text in outputs.items() if "\x1b[" in text] == []
