"""`cohort superlink`, `cohort supernode`, `cohort connect`: a real deployment on Flower's
deployment engine, TLS and SuperNode authentication on, checked before anything starts."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Callable

import typer

from cli.errors import input_errors
from deploy.commands import SUPERLINK_LISTEN_HOST, SUPERLINK_PORT, SUPERNODE_PORT
from common.privacy.ledger import PUBLIC_KEY_FILE
from deploy.launch import SITE_RUNTIME_DIR, SuperLinkLaunch, SuperNodeLaunch, exec_flower, flwr_home, probe_superlink, write_connection


def superlink(
    certs: Annotated[Path, typer.Option("--certs", help="The directory of `cohort certs init` (ca.crt, superlink.crt, superlink.key).")],
    database: Annotated[Path, typer.Option("--database", help="A file that keeps registered SuperNodes and runs across restarts.")],
    host: Annotated[str, typer.Option("--host", help="Where to listen.")] = SUPERLINK_LISTEN_HOST,
    port: Annotated[int, typer.Option("--port", help="Where to listen: the one port SuperNodes and flwr reach.")] = SUPERLINK_PORT,
) -> None:
    """Start the coordinator's SuperLink: TLS, and only registered SuperNodes admitted."""
    launch = SuperLinkLaunch(certs=certs.resolve(), database=database.resolve(), host=host, port=port)
    _start(launch.check, launch.argv())


def supernode(
    superlink_address: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink, as this site dials it.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The federation's ca.crt.")],
    auth_key: Annotated[Path, typer.Option("--auth-key", help="This site's SuperNode key from `cohort certs site` (mode 0600).")],
    name: Annotated[str, typer.Option("--name", help="The site's name in ledgers and metrics.")],
    data: Annotated[Path, typer.Option("--data", help="The site's data: an .npz, an MNIST IDX folder or an image folder.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the site keeps its privacy ledger and signing key; it outlives runs.")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="The site's total privacy budget for this data, over every run.")],
    delta: Annotated[float, typer.Option("--delta", help="The delta of that budget.")],
    port: Annotated[int, typer.Option("--port", help="The SuperNode's local API port; distinct per SuperNode on one machine.")] = SUPERNODE_PORT,
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
    typer.echo(f"site {name}: ledger key {launch.state_dir / PUBLIC_KEY_FILE}, fingerprint {fingerprint} (give it to your auditor out of band)", err=True)
    argv = launch.argv()
    typer.echo(f"starting: {shlex.join(argv)}", err=True)
    exec_flower(argv, first_on_path=launch.state_dir / SITE_RUNTIME_DIR)


def connect(
    connection: Annotated[str, typer.Argument(help="A name for this SuperLink, used as `flwr run . NAME`.")],
    superlink_address: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The federation's ca.crt.")],
) -> None:
    """Let `flwr` on the coordinator reach the SuperLink over TLS (writes Flower's config.toml)."""
    with input_errors():
        reachable = probe_superlink(superlink_address, ca_cert)
        config_file = write_connection(flwr_home(), connection, superlink_address, ca_cert)
    if not reachable:
        typer.echo(f"warning: nothing answers at {superlink_address} yet; the connection is saved anyway", err=True)
    typer.echo(f"wrote connection '{connection}' to {config_file}")


def _start(check: Callable[[], None], argv: list[str]) -> None:
    with input_errors():
        check()
    typer.echo(f"starting: {shlex.join(argv)}", err=True)
    exec_flower(argv)
