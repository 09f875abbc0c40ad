"""systemd units for the coordinator (`cohort superlink`) and a site (`cohort supernode`),
written with the operator's own paths.

Generated rather than shipped as files, because a hardened unit must name exactly what
varies between installations: the `cohort` of the environment Cohort is installed in,
the only directories the service may write (ProtectSystem=strict makes every other one
read-only), and the command line, which comes from the same recipe as docs/deploy.md and
the deployment test (deploy/commands.py).

Each service runs as its own unprivileged user with what systemd offers to confine it,
checked against what runs inside: Flower's SuperLink or SuperNode and the processes they
start (SuperExec, ServerApp or the site's ClientApps, which train with PyTorch) and, for
the coordinator, nginx, which `cohort superlink` starts as its child on an unprivileged
port. Left out, and why:
- MemoryDenyWriteExecute: PyTorch's CPU kernels (oneDNN) generate code at run time; under
  the kernel's equivalent (PR_SET_MDWE) a convolution fails with "could not create a
  primitive" (tests/test_service_units.py shows it).
- ProcSubset=pid: PyTorch reads /proc/cpuinfo.
- PrivateNetwork, IPAddressDeny: a SuperNode dials its SuperLink, the front door serves sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from common.errors import CohortInputError
from deploy import commands
from deploy.fleet_limits import FleetLimits

# A SuperNode killed without deactivating stays online at the SuperLink until it has
# missed HEARTBEAT_PATIENCE heartbeats (2 x 30 s), and a restart before that is refused
# ("Failed to activate SuperNode", exit 305). Restarting after the whole window (and a
# margin for the two clocks) rejoins at the first attempt.
SUPERNODE_RESTART_S = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 5
# The SuperLink keeps its registrations in its database; SuperNodes retry until it is back.
SUPERLINK_RESTART_S = 5
# More failed starts than this within the interval is a crash loop: systemd stops trying.
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL_S = 600
# Exit 2 is Cohort's "your input is wrong" (a missing file, a budget of 0, a state
# directory in use): restarting cannot fix it.
INPUT_ERROR_EXIT = 2
# Enough for `cohort superlink` to stop the SuperLink and nginx (10 s each at most), and
# for a SuperNode to deactivate itself at the SuperLink.
STOP_TIMEOUT_S = 30
# The one capability a service may need: the front door on a port below 1024 (443).
BIND_LOW_PORT = "CAP_NET_BIND_SERVICE"
# nginx and Flower speak TCP over IPv4 or IPv6; Python and glibc use Unix sockets locally.
ADDRESS_FAMILIES = "AF_UNIX AF_INET AF_INET6"

_HARDENING = f"""NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies={ADDRESS_FAMILIES}
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0077"""

# What the hardening hides from a service: ProtectHome=yes and PrivateTmp=yes.
HIDDEN_DIRECTORIES = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))

_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


@dataclass(frozen=True)
class ServiceUnit:
    """description: systemd's one-line name for it; user: the unprivileged account it runs
    as; command: ExecStart's words; writable: the only directories it may write;
    environment: variables it runs with; restart_s: how long after a failure it starts again;
    capability: the one capability it keeps, or none."""

    description: str
    user: str
    command: list[str]
    writable: tuple[Path, ...]
    environment: dict[str, str]
    restart_s: int
    capability: str = ""

    def __post_init__(self) -> None:
        if not _USER_NAME.fullmatch(self.user):
            raise CohortInputError(
                f"--user {self.user!r} is not a system user name; use lowercase letters, digits, '-' and '_'"
            )
        for path in (Path(self.command[0]), *self.writable):
            if not path.is_absolute() or not _PLAIN_WORD.fullmatch(str(path)):
                raise CohortInputError(
                    f"{path}: a service's paths must be absolute, without spaces, quotes or '%'; choose another path"
                )

    def text(self) -> str:
        exec_start = " ".join(_unit_word(word) for word in self.command)
        environment = "\n".join(
            f"Environment={_unit_word(f'{name}={value}')}" for name, value in self.environment.items()
        )
        return f"""# Written by `cohort service`: install steps, users and permissions in docs/deploy.md.
[Unit]
Description={self.description}
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec={START_LIMIT_INTERVAL_S}
StartLimitBurst={START_LIMIT_BURST}

[Service]
Type=exec
User={self.user}
Group={self.user}
ExecStart={exec_start}
{environment}
Restart=on-failure
RestartSec={self.restart_s}
RestartPreventExitStatus={INPUT_ERROR_EXIT}
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_S}
ReadWritePaths={" ".join(str(path) for path in self.writable)}
CapabilityBoundingSet={self.capability}
AmbientCapabilities={self.capability}
{_HARDENING}

[Install]
WantedBy=multi-user.target
"""


def superlink_unit(
    user: str,
    cohort: Path,
    certs: Path,
    database: Path,
    runs_dir: Path,
    host: str,
    port: int,
    local_port: int,
    limits: FleetLimits,
) -> ServiceUnit:
    """The coordinator: `cohort superlink` (the SuperLink, its ServerApps and the nginx
    front door). It writes its database, Flower's home beside it (where the ServerApp
    unpacks each run's app) and the run directories; it binds a port below 1024 only
    with the one capability that allows it."""
    require_visible(cohort, certs, database, runs_dir)
    command = [str(cohort), *commands.superlink_command(certs, database, host, port, local_port)[1:]]
    command += ["--max-model-mb", f"{limits.max_model_mb:g}", "--sites-per-address", str(limits.sites_per_address)]
    return ServiceUnit(
        description="Cohort coordinator: Flower SuperLink behind the front door",
        user=user,
        command=command,
        writable=(database.parent, runs_dir),
        environment={"FLWR_HOME": str(database.parent / "flwr")},
        restart_s=SUPERLINK_RESTART_S,
        capability=BIND_LOW_PORT if port < 1024 else "",
    )


def supernode_unit(
    user: str, cohort: Path, supernode_command: list[str], name: str, state_dir: Path, reads: tuple[Path, ...]
) -> ServiceUnit:
    """A site: `cohort supernode` (Flower's SuperNode and the site's own ClientApps). It
    writes its state directory alone (ledger, key, head, its runtime and Flower's home),
    and reads `reads` (its CA certificate, key and data)."""
    require_visible(cohort, state_dir, *reads)
    return ServiceUnit(
        description=f"Cohort site {name}: Flower SuperNode with the site's own privacy budget",
        user=user,
        command=[str(cohort), *supernode_command[1:]],
        writable=(state_dir,),
        environment={"FLWR_HOME": str(state_dir / "flwr")},
        restart_s=SUPERNODE_RESTART_S,
    )


def require_visible(*paths: Path) -> None:
    """A path under a directory the hardening hides would make the service fail at start."""
    for path in paths:
        hidden = next((d for d in HIDDEN_DIRECTORIES if path == d or d in path.parents), None)
        if hidden is not None:
            raise CohortInputError(
                f"{path} is under {hidden}, which the service cannot see (ProtectHome, PrivateTmp); move it, e.g. "
                "under /opt, /etc or /var/lib"
            )


def _unit_word(word: str) -> str:
    """One word of ExecStart= or Environment=, as systemd reads it: quoted where needed,
    with '%' (a specifier) and '$' (a variable) escaped."""
    if "\n" in word:
        raise CohortInputError(f"{word!r} holds a line break, which a systemd unit cannot take")
    escaped = word.replace("%", "%%").replace("$", "$$")
    if _PLAIN_WORD.fullmatch(word):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
