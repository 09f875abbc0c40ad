"""Following a run from the host its ServerApp writes on: one report a round, as each
lands in the run directory's metrics.jsonl, until the `flwr run --stream` that submitted
it ends. `cohort simulate` and `cohort run` both follow their runs this way."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from server.records import RoundRecord
from server.rundir import RunDirectory

POLL_INTERVAL_S = 0.5
# Once summary.json exists the run is over; `flwr run --stream` gets this long to drain
# the rest of the log stream before it is stopped.
DRAIN_S = 15.0

RoundCallback = Callable[[RoundRecord], None]


def follow_run(process: subprocess.Popen[bytes], run_dir: RunDirectory, on_round: RoundCallback) -> None:
    """Report each new round as it lands in metrics.jsonl, until process ends."""
    reported = {r.round for r in run_dir.read_metrics()}
    while True:
        if run_dir.summary_file.exists():
            _wait_quietly(process, DRAIN_S)
        finished = process.poll() is not None
        for record in run_dir.read_metrics():
            if record.round not in reported:
                reported.add(record.round)
                on_round(record)
        if finished:
            return
        time.sleep(POLL_INTERVAL_S)


def _wait_quietly(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait()
