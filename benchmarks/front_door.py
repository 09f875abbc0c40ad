"""What one unauthenticated address can still make the SuperLink hold, behind the front door.

Bodies past a route's limit never reach the SuperLink (tests/test_deployment.py pushes
300-600 MB ones). What does reach it is a body up to push-object's limit, as many at once
as the address's allowance of object pushes in flight. Per row, a real `cohort superlink`
(SuperLink and nginx front door) on loopback; one address sends push-object bodies of
zeros exactly at the limit, its allowance plus four at once, three times over; the
SuperLink's resident memory is sampled every 20 ms. Flower reads, parses and rejects
each body (no SuperNode signature), so the peak is what such bodies cost it.

    .venv/bin/python -m benchmarks.front_door        (needs Debian's nginx)
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.results import run_table
from deploy import commands
from deploy.certificates import CertificateLayout, init_certificates
from deploy.fleet_limits import OBJECT_ROUTE, FleetLimits
from simulations.local_superlink import free_port, stop_process_tree

ROWS = [FleetLimits(), FleetLimits(sites_per_address=4), FleetLimits(max_model_mb=1)]
ATTACKER = "127.0.0.2"
ROUNDS = 3
MB = 1 << 20


def run_one(limits: FleetLimits, directory: Path) -> dict[str, Any]:
    certs = CertificateLayout(directory / "certs")
    if not certs.ca_cert.exists():
        init_certificates(certs.root, ["localhost"], passphrase=b"benchmark passphrase")
    port = free_port()
    command = commands.superlink_command(certs.root, directory / f"superlink-{port}.db", "127.0.0.1", port, free_port())
    command += ["--max-model-mb", str(limits.max_model_mb), "--sites-per-address", str(limits.sites_per_address)]
    env = {**os.environ, "FLWR_HOME": str(directory / "home")}
    with (directory / f"superlink-{port}.log").open("wb") as log:
        coordinator = subprocess.Popen(
            [str(Path(sys.executable).parent / "cohort"), *command[1:]], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        superlink = _serving_superlink(coordinator, f"https://127.0.0.1:{port}", context)
        before = superlink.memory_info().rss
        peak, statuses = _flood(superlink, f"https://127.0.0.1:{port}{OBJECT_ROUTE}", context, limits)
    finally:
        stop_process_tree(coordinator.pid)
        coordinator.wait()
    return {
        "max_model_mb": limits.max_model_mb,
        "sites_per_address": limits.sites_per_address,
        "body_bytes": limits.body_limit(OBJECT_ROUTE),
        "in_flight_allowed": limits.object_pushes_per_address,
        "answers": dict(Counter(statuses)),
        "superlink_mb_before": round(before / MB),
        "superlink_growth_mb": round((peak - before) / MB),
    }


def _serving_superlink(coordinator: subprocess.Popen[bytes], url: str, context: ssl.SSLContext) -> psutil.Process:
    """The SuperLink process, once the front door answers (403 on its health route)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and coordinator.poll() is None:
        try:
            if httpx.get(f"{url}/health", verify=context, timeout=1).status_code == 403:
                (superlink,) = [
                    p
                    for p in psutil.Process(coordinator.pid).children(recursive=True)
                    if "flower-superlink" in " ".join(p.cmdline()[:2])
                ]
                return superlink
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("cohort superlink did not start; its log is beside the results")


def _flood(superlink: psutil.Process, url: str, context: ssl.SSLContext, limits: FleetLimits) -> tuple[int, list[int]]:
    """Peak resident memory while ROUNDS waves of bodies at the limit arrive at once."""
    body = bytes(limits.body_limit(OBJECT_ROUTE))
    peak = [superlink.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], superlink.memory_info().rss)
            done.wait(0.02)

    def push(_: int) -> int:
        with httpx.Client(transport=httpx.HTTPTransport(verify=context, local_address=ATTACKER), timeout=120) as client:
            return client.post(url, content=body, headers={"content-type": "application/protobuf"}).status_code

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses: list[int] = []
    wave = limits.object_pushes_per_address + 4
    with ThreadPoolExecutor(wave) as pool:
        for _ in range(ROUNDS):
            statuses += pool.map(push, range(wave))
    time.sleep(1)
    done.set()
    sampler.join()
    return peak[0], statuses


def run(directory: Path) -> list[dict[str, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    return [run_one(limits, directory) for limits in ROWS]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| --max-model-mb | --sites-per-address | push-object limit | in flight per address | answers | "
            "SuperLink before | growth |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['max_model_mb']:g} | {r['sites_per_address']} | {r['body_bytes']:,} B | {r['in_flight_allowed']} | "
        f"{', '.join(f'{n}x {s}' for s, n in sorted(r['answers'].items()))} | {r['superlink_mb_before']} MB | "
        f"+{r['superlink_growth_mb']} MB |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    run_table("front_door", run, markdown)
