"""`cohort site`: a site's own ledger key (`init`, run at the site), and on the
coordinator's host the sites by name (`register`, `list`, `unregister`, `ledger-key`),
kept in the site book of a SuperLink connection (deploy/site_registration.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import input_errors
from cli.terminal import labelled, paragraph
from common.privacy.ledger import PUBLIC_KEY_FILE
from deploy.launch import flwr_home, init_site_state
from deploy.site_registration import Registrar

site_app = typer.Typer(
    rich_markup_mode="markdown",
    help="A site's ledger key (at the site); sites by name (on the coordinator's host).",
    no_args_is_help=True,
)
NameArgument = Annotated[str, typer.Argument(help="The site's name, as its SuperNode's --name.")]
ConnectionArgument = Annotated[str, typer.Argument(help="The SuperLink connection that `cohort connect` made.")]


@site_app.command()
def init(
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="Where the site keeps its privacy ledger and signing key; it outlives runs."),
    ],
) -> None:
    """Make the site's ledger signing key (kept if it exists) and print its fingerprint."""
    with input_errors():
        fingerprint = init_site_state(state_dir.resolve())
    typer.echo(labelled("ledger key", state_dir.resolve() / PUBLIC_KEY_FILE))
    typer.echo(labelled("fingerprint", fingerprint))
    typer.echo(
        paragraph(
            "Give the fingerprint to your auditor out of band, to check the ledger_key.pub.pem they are later sent."
        )
    )


@site_app.command()
def register(
    name: NameArgument,
    connection: ConnectionArgument,
    key: Annotated[Path, typer.Option("--key", help="The NAME.pub the site sent (`cohort certs site`).")],
) -> None:
    """Register a site's SuperNode key with Flower under its name: that node then speaks
    for this name alone, in every run `cohort run` submits on the connection."""
    with input_errors():
        node_id = Registrar(connection, flwr_home()).register(name, key)
    typer.echo(f"registered site {name} as node {node_id}")


@site_app.command()
def unregister(name: NameArgument, connection: ConnectionArgument) -> None:
    """Unregister a site's SuperNode by name: the SuperLink refuses it from now on. The
    name keeps its ledger key, for when the site is registered again."""
    with input_errors():
        node_id = Registrar(connection, flwr_home()).unregister(name)
    typer.echo(f"unregistered site {name} (node {node_id})")


@site_app.command("list")
def list_sites(connection: ConnectionArgument) -> None:
    """The sites by name: node id, Flower's status, ledger key, newest accepted entry."""
    with input_errors():
        sites = Registrar(connection, flwr_home()).listing()
    for site in sites:
        node = "-" if site.node_id is None else str(site.node_id)
        newest = "none" if site.newest_sequence is None else str(site.newest_sequence)
        changes = f", {site.key_changes} key change(s)" if site.key_changes else ""
        typer.echo(f"{site.name}: node {node}, {site.status}, newest entry {newest}{changes}")
        typer.echo(labelled("  ledger key", site.ledger_key or "not seen yet"))


@site_app.command("ledger-key")
def ledger_key(
    name: NameArgument,
    connection: ConnectionArgument,
    key: Annotated[Path, typer.Option("--key", help="The site's new ledger_key.pub.pem.")],
) -> None:
    """Accept a new ledger key for a site (its key was lost or rotated; check the
    fingerprint with the site out of band). `cohort audit` shows the change."""
    with input_errors():
        fingerprint = Registrar(connection, flwr_home()).set_ledger_key(name, key)
    typer.echo(labelled(f"site {name}: new ledger key", fingerprint))
