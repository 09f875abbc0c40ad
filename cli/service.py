"""`cohort service superlink`, `cohort service supernode`: systemd units that run the
coordinator and a site as unprivileged, confined services, with this installation's
`cohort` and the operator's own paths (deploy/service_units.py says what each confines)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.deploy import (
    AuthKeyOption,
    CaCertOption,
    CertsOption,
    DatabaseOption,
    DataOption,
    DeltaOption,
    EpsilonOption,
    HostOption,
    LocalPortOption,
    MaxModelOption,
    PortOption,
    SiteNameOption,
    SitesPerAddressOption,
    StateDirOption,
    SuperLinkAddressOption,
    SuperNodePortOption,
)
from cli.errors import input_errors
from cli.terminal import labelled, paragraph
from common.config import validate_budget
from common.errors import CohortInputError
from deploy import commands
from deploy.certificates import validate_site_name
from deploy.fleet_limits import DEFAULT_MAX_MODEL_MB, DEFAULT_SITES_PER_ADDRESS, FleetLimits
from deploy.service_units import ServiceUnit, superlink_unit, supernode_unit
from server.rundir import write_bytes_atomic

service_app = typer.Typer(
    rich_markup_mode="markdown",
    help="systemd units for the coordinator and the sites (install steps: docs/deploy.md).",
    no_args_is_help=True,
)

UnitFileArgument = Annotated[
    Path, typer.Argument(help="Where to write the unit, e.g. /etc/systemd/system/cohort-superlink.service.")
]
UserOption = Annotated[
    str, typer.Option("--user", help="The unprivileged account the service runs as; create it first.")
]


@service_app.command("superlink")
def superlink_service(
    unit_file: UnitFileArgument,
    user: UserOption,
    certs: CertsOption,
    database: DatabaseOption,
    runs_dir: Annotated[
        Path,
        typer.Option("--runs-dir", help="Where the ServerApp may write run directories (run-dir= in a run config)."),
    ],
    host: HostOption = commands.SUPERLINK_LISTEN_HOST,
    port: PortOption = commands.SUPERLINK_PORT,
    local_port: LocalPortOption = commands.SUPERLINK_LOCAL_PORT,
    max_model_mb: MaxModelOption = DEFAULT_MAX_MODEL_MB,
    sites_per_address: SitesPerAddressOption = DEFAULT_SITES_PER_ADDRESS,
) -> None:
    """Write a unit that runs `cohort superlink` (the SuperLink and its front door)."""
    with input_errors():
        limits = FleetLimits(max_model_mb, sites_per_address)
        _write(
            unit_file,
            superlink_unit(
                user, _cohort(), certs.resolve(), database.resolve(), runs_dir.resolve(), host, port, local_port, limits
            ),
        )


@service_app.command("supernode")
def supernode_service(
    unit_file: UnitFileArgument,
    user: UserOption,
    superlink_address: SuperLinkAddressOption,
    ca_cert: CaCertOption,
    auth_key: AuthKeyOption,
    name: SiteNameOption,
    data: DataOption,
    state_dir: StateDirOption,
    epsilon: EpsilonOption,
    delta: DeltaOption,
    port: SuperNodePortOption = commands.SUPERNODE_PORT,
) -> None:
    """Write a unit that runs `cohort supernode` for one site."""
    with input_errors():
        validate_site_name(name)
        validate_budget(epsilon, delta, source=f"site {name}'s --epsilon/--delta")
        ca, key, site_data, state = ca_cert.resolve(), auth_key.resolve(), data.resolve(), state_dir.resolve()
        command = commands.supernode_command(superlink_address, ca, key, name, site_data, state, epsilon, delta, port)
        _write(unit_file, supernode_unit(user, _cohort(), command, name, state, reads=(ca, key, site_data)))


def _cohort() -> Path:
    """This installation's `cohort`, which the unit runs."""
    return Path(sys.executable).parent / "cohort"


def _write(unit_file: Path, unit: ServiceUnit) -> None:
    if not unit_file.parent.is_dir():
        raise CohortInputError(
            f"{unit_file}: folder {unit_file.parent} does not exist; "
            "give a path in an existing folder (/etc/systemd/system)"
        )
    write_bytes_atomic(unit_file, unit.text().encode(), mode=0o644)
    typer.echo(labelled("wrote", unit_file))
    typer.echo(paragraph(f"Then: `systemctl daemon-reload && systemctl enable --now {unit_file.name}`"))
