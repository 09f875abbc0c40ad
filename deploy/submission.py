"""`cohort run`: a study submitted to the coordinator's SuperLink with stock `flwr run`,
followed one line a round, and its outcome told as it is.

Flower alone says too little: a misspelt run-config key reaches the SuperLink, which
answers only "Invalid run configuration", and `flwr run --stream` exits 0 however the run
ended. So the run config is validated here first, against Cohort's own settings; the run
is submitted with `flwr run … --stream` (its output goes to the run directory's
flower.log); the rounds are read from the run directory, which the ServerApp writes on
this host (Cohort's recipe runs `cohort run` on the SuperLink's host); and the outcome is
Flower's own record of the run (`flwr list --run-id`), which says `finished:failed` with
the reason when Cohort's run stopped early (server/run_outcome.py), together with the
run's summary.json.

While it follows the run, `cohort run` holds the run directory's lock (a second command
on the same directory is refused). Stopping `cohort run` stops the following, not the
run: the SuperLink runs it to its end (`flwr stop RUN_ID CONNECTION` stops it).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from common.errors import CohortInputError
from common.private_files import open_private
from deploy.commands import SUPERLINK_LOCAL_ADDRESS
from deploy.directory_lock import run_directory_lock
from deploy.flower_runtime import (
    app_folder,
    die_with_parent,
    flower_executable,
    flwr_json,
    install_flower_launchers,
    offline_flower_env,
)
from deploy.launch import FLOWER_CONFIG_FILE, flower_config
from deploy.run_follower import RoundCallback, follow_run
from deploy.site_registration import site_book_path
from server.pretraining import check_public_dataset
from server.records import Summary
from server.run_config import RunConfig
from server.rundir import CONFIG_FILE, RunDirectory

# What `flwr run` prints once the SuperLink has accepted the run.
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"
# The stream ends with the run; Flower may record its final status a moment later.
STATUS_WAIT_S = 30.0
BOX_DRAWING = " \t│╭╮╰╯─"


@dataclass(frozen=True)
class RunOutcome:
    """run_id: None when the SuperLink never started the run (last_message: what `flwr
    run` said last); status, details: Flower's record of it (`finished:completed`,
    `finished:failed`, `finished:stopped`), '' when unknown; summary: the run directory's
    summary.json, None when the run wrote none; interrupted: `cohort run` stopped
    following before the run ended."""

    run_id: int | None
    status: str
    details: str
    summary: Summary | None
    log_file: Path
    last_message: str = ""
    interrupted: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == COMPLETED and self.summary is not None and not self.summary.stop_reason

    def failure(self) -> str:
        """Why the run did not succeed, in one sentence."""
        if self.run_id is None:
            return (
                f"flwr run started no run ({self.last_message or 'it said nothing'}); its output is in {self.log_file}"
            )
        if self.summary is not None and self.summary.stop_reason:
            return f"run {self.run_id} {self.summary.stop_reason}"
        if self.status == COMPLETED:
            return f"run {self.run_id} completed but wrote no summary.json; its log is in {self.log_file}"
        reason = f": {self.details}" if self.details else ""
        return (
            f"run {self.run_id} ended {self.status or 'with an unknown status'}{reason}; its log is in {self.log_file}"
        )


@dataclass(frozen=True)
class Submission:
    """connection: the SuperLink connection `cohort connect` wrote into Flower's home;
    run: the validated run config, its run directory fixed (see `submission`)."""

    connection: str
    run: RunConfig
    flwr_home: Path

    @property
    def run_dir(self) -> RunDirectory:
        """Where the ServerApp writes: the run it resumes, or the run's own directory."""
        return RunDirectory(Path(self.run.resume_from or self.run.run_dir))

    def check(self) -> None:
        check_public_dataset(self.run)
        if not self.run.resume_from and (self.run_dir.path / CONFIG_FILE).exists():
            raise CohortInputError(
                f"run directory {self.run_dir.path} already holds a run; give another run-dir, or "
                f"resume-from={self.run_dir.path} to continue it"
            )
        connections = flower_config(self.flwr_home).get("superlink", {})
        if self.connection not in connections:
            raise CohortInputError(
                f"no connection '{self.connection}' in {self.flwr_home / FLOWER_CONFIG_FILE}; on the SuperLink's host "
                f"run `cohort connect {self.connection} --superlink {SUPERLINK_LOCAL_ADDRESS} --ca-cert CERTS/ca.crt`"
            )

    def submit_and_follow(self, on_start: Callable[[RunDirectory], None], on_round: RoundCallback) -> RunOutcome:
        """Submit with `flwr run --stream`, report each round, and return how the run ended."""
        run_dir = self.run_dir
        log_file = run_dir.path / "flower.log"
        with (
            run_directory_lock(run_dir.path, "cohort run"),
            tempfile.TemporaryDirectory(prefix="cohort-run-") as private,
        ):
            overrides = Path(private) / "run-config.toml"
            overrides.write_text(tomli_w.dumps(self.run.to_flower()), encoding="utf-8")
            launchers = install_flower_launchers(Path(private) / "bin")
            command = [
                flower_executable("flwr", launchers),
                "run",
                str(app_folder(Path(private) / "app")),
                self.connection,
                "--run-config",
                str(overrides),
                "--stream",
            ]
            offset = log_file.stat().st_size if log_file.exists() else 0
            if self.run.resume_from:
                run_dir.reopen()  # its old summary.json would read as this run's end
            on_start(run_dir)
            with open_private(log_file, "ab") as log:
                process = subprocess.Popen(
                    command,
                    env=offline_flower_env(self.flwr_home, launchers),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
                try:
                    follow_run(process, run_dir, on_round)
                except KeyboardInterrupt:
                    return RunOutcome(_started_run(_output(log_file, offset)), "", "", None, log_file, interrupted=True)
                finally:
                    if process.poll() is None:
                        process.terminate()
                        process.wait()
        output = _output(log_file, offset)
        run_id = _started_run(output)
        status, details = self._flower_status(run_id) if run_id is not None else ("", "")
        return RunOutcome(run_id, status, details, run_dir.read_summary(), log_file, _last_message(output))

    def _flower_status(self, run_id: int) -> tuple[str, str]:
        """Flower's record of the run: (status, details), once it says the run finished."""
        deadline = time.monotonic() + STATUS_WAIT_S
        while True:
            try:
                (row,) = flwr_json(("list",), self.connection, self.flwr_home, ("--run-id", str(run_id)))["runs"]
            except (CohortInputError, KeyError, ValueError) as error:
                return "", f"`flwr list` could not say how it ended ({error})"
            if row["status"].startswith("finished") or time.monotonic() > deadline:
                return row["status"], row["status-details"]
            time.sleep(1)


def submission(connection: str, run: RunConfig, flwr_home: Path) -> Submission:
    """The submission of run, with its run directory made absolute on this host (a new run
    without one gets runs/<run-name>-<timestamp> here), so that this command and the
    ServerApp agree on where the run is written, and with the connection's site book
    (where `cohort site register` recorded the sites), unless it names another."""
    if not run.site_book:
        run = replace(run, site_book=str(site_book_path(flwr_home, connection)))
    if run.resume_from:
        run = replace(run, resume_from=str(Path(run.resume_from).resolve()))
    else:
        run = replace(run, run_dir=str(RunDirectory.for_new_run(run).path))
    return Submission(connection, run, flwr_home)


def _output(log_file: Path, offset: int) -> str:
    """What this command's `flwr run` wrote to the log, which may hold earlier runs' too."""
    with log_file.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _started_run(output: str) -> int | None:
    started = RUN_STARTED.search(output)
    return int(started.group(1)) if started else None


def _last_message(output: str) -> str:
    """What `flwr run` said last, on one line: its last error box (Flower draws its errors
    in one), else its last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    boxes = [number for number, line in enumerate(lines) if line.startswith("╭")]
    last = lines[boxes[-1] :] if boxes else lines[-1:]
    return " ".join(part for part in (line.strip(BOX_DRAWING) for line in last) if part)
