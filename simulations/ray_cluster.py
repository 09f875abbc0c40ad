"""Where a simulation's sites run: a Ray of its own on this machine, or an existing Ray
cluster (`ray-address`), which Flower's simulation engine joins as a driver.

Flower's engine calls `ray.init()` without an address, and Ray then joins the cluster named
by the RAY_ADDRESS environment variable or, failing that, any cluster that `ray start`
started on this machine (a stale record of a dead one included, on which it hangs). So
the simulation's SuperLink (and so its engine) is given exactly the plan's `ray-address`
there, or Ray's 'local' (a Ray of the run's own) when the plan names none: never one left
in the user's environment or on the machine, and `simulation.json` says where a run ran.
What every node of a cluster must share (the same Python environment at the same path, the
run directory and the federation home on a shared filesystem) is in README.md,
"Simulations beyond one machine".
"""

from __future__ import annotations

import re
import socket

from common.errors import CohortInputError

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Ray's keyword for a Ray of the driver's own, whatever else runs on this machine.
OWN_RAY = "local"
# Ray's own keyword: the cluster whose head runs on this machine (`ray start --head`).
THIS_MACHINES_CLUSTER = "auto"
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")
REACH_TIMEOUT_S = 5.0


def check_ray_address(address: str) -> None:
    """An empty address (a Ray of the simulation's own), 'auto', or the head's HOST:PORT."""
    if address in ("", THIS_MACHINES_CLUSTER):
        return
    match = _HOST_PORT.match(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise CohortInputError(
            f"ray-address is {address!r}; give the head node's HOST:PORT as `ray start --head` printed it "
            f"(e.g. 10.0.0.5:6379), or '{THIS_MACHINES_CLUSTER}' on a node of the cluster"
        )


def require_reachable(address: str) -> None:
    """Refuse, before anything starts, a HOST:PORT where no cluster's head answers (Ray
    itself would retry for a minute and then fail inside the run)."""
    match = _HOST_PORT.match(address)
    if match is None:
        return
    host = match["host"].strip("[]")
    try:
        socket.create_connection((host, int(match["port"])), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise CohortInputError(
            f"no Ray cluster answers at ray-address {address} ({error.strerror or error}); start its head with "
            f"`ray start --head --port={match['port']}` or correct ray-address"
        ) from None


def engine_environment(env: dict[str, str], address: str) -> dict[str, str]:
    """The simulation engine's environment: it joins the cluster at `address`, or starts a
    Ray of its own when the address is empty."""
    return {**env, RAY_ADDRESS_ENV: address or OWN_RAY}
