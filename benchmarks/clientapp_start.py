"""What a deployed site pays to start one ClientApp task, before it reads its message.

Cold: a fresh `python -I` that imports the site's runner and ClientApp, as every task's
process did before the fork server (PyTorch, Opacus, scikit-learn, Flower). Warm: the
site's `flwr-clientapp` launching a task in its fork server (deploy/clientapp_forkserver.py)
that prints its usage and exits: the launcher's start, the fork and the exit. Measured
alternately, one after the other, so that both see the same machine; the fork server's
own start (paid once per `cohort supernode`) is its own row.

    .venv/bin/python -m benchmarks.clientapp_start
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import run_table
from deploy.clientapp_forkserver import wait_until_serving
from deploy.launch import flower_env, forkserver_argv, install_site_runner

REPEATS = 7
COLD = [sys.executable, "-I", "-c", "import client.site_runner, client.app"]


def _seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(directory: Path) -> list[dict[str, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cohort-clientapps-") as folder:
        sockets = Path(folder)
        clientapp = install_site_runner(directory / "state", sockets) / "flwr-clientapp"
        env = flower_env(clientapp.parent)
        start = time.perf_counter()
        server = subprocess.Popen(forkserver_argv(sockets), env=env)
        try:
            if not wait_until_serving(sockets, lambda: server.poll() is None, 300):
                raise RuntimeError("the fork server did not start")
            startup = time.perf_counter() - start
            cold, warm = [], []
            for _ in range(REPEATS):
                cold.append(_seconds(COLD, env))
                warm.append(_seconds([str(clientapp), "--help"], env))
        finally:
            server.terminate()
            server.wait(timeout=30)
    return [
        {"what": "the fork server's start (once per cohort supernode)", "seconds": [startup]},
        {"what": "a task's start, cold (a new process imports the ClientApp)", "seconds": cold},
        {"what": "a task's start, warm (forked from the fork server)", "seconds": warm},
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| what | median s | min-max s |", "| --- | --- | --- |"]
    for row in rows:
        seconds = row["seconds"]
        lines.append(f"| {row['what']} | {statistics.median(seconds):.3f} | {min(seconds):.3f}-{max(seconds):.3f} |")
    cold, warm = (statistics.median(row["seconds"]) for row in rows[1:])
    lines.append(f"\ncold / warm: {cold / warm:.0f}x ({REPEATS} of each, alternating)")
    return "\n".join(lines)


if __name__ == "__main__":
    run_table("clientapp-start", run, markdown)
