"""`cohort superlink`, `cohort front-door`, `cohort supernode`, `cohort connect`, `cohort
run`: a real deployment on Flower's deployment engine, TLS and SuperNode authentication
on, sites reaching the Fleet API alone, checked before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import input_errors
from cli.rounds import round_line
from cli.terminal import echo_message, labelled
from common.errors import CohortInputError
from common.privacy.ledger import PUBLIC_KEY_FILE
from deploy.certificates import LOOPBACK
from deploy.commands import SUPERLINK_LISTEN_HOST, SUPERLINK_LOCAL_PORT, SUPERLINK_PORT, SUPERNODE_PORT, shell_line
from deploy.coordinator import CoordinatorLaunch
from deploy.fleet_limits import DEFAULT_MAX_MODEL_MB, DEFAULT_SITES_PER_ADDRESS, FleetLimits
from deploy.flower_runtime import require_app_dir
from deploy.front_door import FrontDoor
from deploy.launch import (
    SuperLinkLaunch,
    SuperNodeLaunch,
    flwr_home,
    probe_superlink,
    split_address,
    write_connection,
)
from deploy.submission import RunOutcome, submission
from server.records import RoundRecord
from server.run_config import RunConfig
from simulations.plan import parse_overrides

CertsOption = Annotated[
    Path, typer.Option("--certs", help="The directory of `cohort certs init` (ca.crt, superlink.crt, superlink.key).")
]
HostOption = Annotated[str, typer.Option("--host", help="Where the front door listens: the address sites reach.")]
PortOption = Annotated[
    int, typer.Option("--port", help="The front door's port: the one port sites reach (Fleet API only).")
]
MaxModelOption = Annotated[
    float,
    typer.Option(
        "--max-model-mb",
        help="The largest model update (MB) the front door admits; it sizes the Fleet routes' body limits.",
    ),
]
SitesPerAddressOption = Annotated[
    int,
    typer.Option(
        "--sites-per-address",
        help="SuperNodes that may reach the front door from one address; it sizes the per-address limits.",
    ),
]
DatabaseOption = Annotated[
    Path, typer.Option("--database", help="A file that keeps registered SuperNodes and runs across restarts.")
]
LocalPortOption = Annotated[
    int,
    typer.Option(
        "--local-port", help="The SuperLink's own port on 127.0.0.1: flwr and `cohort connect` on this host use it."
    ),
]
SuperLinkAddressOption = Annotated[
    str, typer.Option("--superlink", help="HOST:PORT of the SuperLink, as this site dials it.")
]
CaCertOption = Annotated[Path, typer.Option("--ca-cert", help="The federation's ca.crt.")]
AuthKeyOption = Annotated[
    Path, typer.Option("--auth-key", help="This site's SuperNode key from `cohort certs site` (mode 0600).")
]
SiteNameOption = Annotated[str, typer.Option("--name", help="The site's name in ledgers and metrics.")]
DataOption = Annotated[
    Path, typer.Option("--data", help="The site's data: an .npz, an MNIST IDX folder or an image folder.")
]
StateDirOption = Annotated[
    Path, typer.Option("--state-dir", help="Where the site keeps its privacy ledger and signing key; it outlives runs.")
]
EpsilonOption = Annotated[
    float, typer.Option("--epsilon", help="The site's total privacy budget for this data, over every run.")
]
DeltaOption = Annotated[float, typer.Option("--delta", help="The delta of that budget.")]
SuperNodePortOption = Annotated[
    int, typer.Option("--port", help="The SuperNode's local API port; distinct per SuperNode on one machine.")
]


def superlink(
    certs: CertsOption,
    database: DatabaseOption,
    host: HostOption = SUPERLINK_LISTEN_HOST,
    port: PortOption = SUPERLINK_PORT,
    local_port: LocalPortOption = SUPERLINK_LOCAL_PORT,
    local_host: Annotated[
        str,
        typer.Option(
            "--local-host",
            help="Where the SuperLink listens; not 127.0.0.1 only with --no-front-door, on a private network.",
        ),
    ] = LOOPBACK,
    front_door: Annotated[
        bool,
        typer.Option(
            "--front-door/--no-front-door",
            help="Start the front door here (default), or run it elsewhere with `cohort front-door`.",
        ),
    ] = True,
    max_model_mb: MaxModelOption = DEFAULT_MAX_MODEL_MB,
    sites_per_address: SitesPerAddressOption = DEFAULT_SITES_PER_ADDRESS,
) -> None:
    """Start the coordinator's side: the SuperLink on loopback (TLS, only registered
    SuperNodes admitted) and the front door, which serves sites the Fleet API and refuses
    everything else. Ctrl-C or SIGTERM stops both."""
    with input_errors():
        if front_door and local_host != LOOPBACK:
            raise CohortInputError(
                f"--local-host {local_host}: behind the front door the "
                f"SuperLink listens on {LOOPBACK} only; drop --local-host"
            )
        link = SuperLinkLaunch(certs=certs.resolve(), database=database.resolve(), host=local_host, port=local_port)
        limits = FleetLimits(max_model_mb, sites_per_address)
        door = FrontDoor(certs.resolve(), host, port, LOOPBACK, local_port, limits) if front_door else None
        code = CoordinatorLaunch(link, door).run()
    raise typer.Exit(code)


def front_door(
    certs: CertsOption,
    upstream: Annotated[
        str,
        typer.Option(
            "--upstream", help="HOST:PORT of the SuperLink on a private network (its certificate must cover HOST)."
        ),
    ],
    host: HostOption = SUPERLINK_LISTEN_HOST,
    port: PortOption = SUPERLINK_PORT,
    max_model_mb: MaxModelOption = DEFAULT_MAX_MODEL_MB,
    sites_per_address: SitesPerAddressOption = DEFAULT_SITES_PER_ADDRESS,
) -> None:
    """Run only the front door, for a SuperLink started elsewhere with `cohort superlink
    --no-front-door` (docker/compose.yml): sites get the Fleet API and nothing else."""
    with input_errors():
        upstream_host, upstream_port = split_address(upstream)
        door = FrontDoor(
            certs.resolve(), host, port, upstream_host, upstream_port, FleetLimits(max_model_mb, sites_per_address)
        )
        code = CoordinatorLaunch(None, door).run()
    raise typer.Exit(code)


def supernode(
    superlink_address: SuperLinkAddressOption,
    ca_cert: CaCertOption,
    auth_key: AuthKeyOption,
    name: SiteNameOption,
    data: DataOption,
    state_dir: StateDirOption,
    epsilon: EpsilonOption,
    delta: DeltaOption,
    port: SuperNodePortOption = SUPERNODE_PORT,
) -> None:
    """Start a site's SuperNode with its own data, state and privacy budget; it runs only the
    site's installed Cohort (docs/site.md), and makes the site's ledger key on first start."""
    launch = SuperNodeLaunch(
        superlink=superlink_address,
        ca_cert=ca_cert.resolve(),
        auth_key=auth_key.resolve(),
        name=name,
        data=data.resolve(),
        state_dir=state_dir.resolve(),
        epsilon=epsilon,
        delta=delta,
        port=port,
    )
    with input_errors():
        launch.check()
        fingerprint = launch.prepare()
    typer.echo(labelled(f"site {name}: ledger key", launch.state_dir / PUBLIC_KEY_FILE), err=True)
    typer.echo(labelled("fingerprint (give it to your auditor out of band)", fingerprint), err=True)
    typer.echo(f"starting:\n{shell_line(launch.argv())}", err=True)
    raise typer.Exit(launch.supervise())


def connect(
    connection: Annotated[str, typer.Argument(help="A name for this SuperLink, used as `flwr run . NAME`.")],
    superlink_address: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The federation's ca.crt.")],
) -> None:
    """Let `flwr` on the coordinator reach the SuperLink over TLS (writes Flower's config.toml).

    Run it on the SuperLink's host with --superlink 127.0.0.1:LOCAL_PORT: the front door
    that sites reach refuses every `flwr` command."""
    with input_errors():
        reachable = probe_superlink(superlink_address, ca_cert)
        config_file = write_connection(flwr_home(), connection, superlink_address, ca_cert)
    if not reachable:
        typer.echo(f"warning: nothing answers at {superlink_address} yet; the connection is saved anyway", err=True)
    typer.echo(f"wrote connection '{connection}' to {config_file}")


def run(
    connection: Annotated[str, typer.Argument(help="The SuperLink connection that `cohort connect` made.")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help=(
                "A run setting, e.g. --set rounds=20 (repeatable); the "
                "settings are [tool.flwr.app.config] in pyproject.toml."
            ),
        ),
    ] = None,
) -> None:
    """Submit a study to the coordinator's SuperLink and follow it, one line a round.

    Exits 0 only when the run completed; 1 when it stopped early (every site refused, too
    few updates) or failed, with the reason. Run it on the SuperLink's host, where the
    ServerApp writes the run directory."""
    with input_errors():
        require_app_dir()
        config = RunConfig.from_flower(parse_overrides(set_ or []))
        if config.data.keeps_transcript:
            raise CohortInputError(
                "audit-canaries keeps the canary site's every update for the empirical audit, which only a "
                "simulation may do (cohort simulate); a deployed run sets audit-canaries = 0"
            )
        if config.data.audit_canary_clients:
            raise CohortInputError(
                "audit-canary-clients adds simulated canary clients for the client-level estimate, which only a "
                "simulation may do (cohort simulate); a deployed run sets audit-canary-clients = 0"
            )
        study = submission(connection, config, flwr_home())
        study.check()

        def on_round(record: RoundRecord) -> None:
            typer.echo(round_line(record, study.run.training.rounds))

        outcome = study.submit_and_follow(lambda run_dir: typer.echo(labelled("run directory", run_dir.path)), on_round)
    _report(outcome, connection)


def _report(outcome: RunOutcome, connection: str) -> None:
    if outcome.interrupted:
        stop = (
            f"`flwr stop {outcome.run_id} {connection}` stops it"
            if outcome.run_id is not None
            else "`flwr ls` lists it"
        )
        echo_message(f"interrupted: no longer following; the run goes on at the SuperLink ({stop})")
        raise typer.Exit(code=130)
    if not outcome.succeeded:
        echo_message(f"error: {outcome.failure()}")
        raise typer.Exit(code=1)
    summary = outcome.summary
    assert summary is not None  # a run that succeeded wrote its summary.json
    epsilon = summary.client_level_epsilon or summary.max_epsilon
    privacy = "no DP" if epsilon is None else f"epsilon {epsilon:.3f}"
    accuracy = "-" if summary.final_accuracy is None else f"{summary.final_accuracy:.4f}"
    typer.echo(f"run {outcome.run_id} completed: {summary.rounds} rounds, global test accuracy {accuracy}, {privacy}")
