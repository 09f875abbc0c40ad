"""`cohort site`: a site's own state (its ledger key and pin, what a restore needs, key
rotation and retirement), run at the site; and on the coordinator's host the sites by name
(`register`, `list`, `unregister`, `ledger-key`), kept in the site book of a SuperLink
connection (deploy/site_registration.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import input_errors
from cli.terminal import echo_message, labelled, paragraph
from client.policy import LEDGER_KEY, POLICY_FILE
from common.privacy.ledger import PUBLIC_KEY_FILE
from deploy.launch import flwr_home, init_site_state
from deploy.site_registration import Registrar

site_app = typer.Typer(
    rich_markup_mode="markdown",
    help="A site's own state: its ledger key, pin and ledger (at the site); sites by name (on the coordinator's host).",
    no_args_is_help=True,
)
NameArgument = Annotated[str, typer.Argument(help="The site's name, as its SuperNode's --name.")]
ConnectionArgument = Annotated[str, typer.Argument(help="The SuperLink connection that `cohort connect` made.")]

StateDir = Annotated[
    Path,
    typer.Option("--state-dir", help="Where the site keeps its privacy ledger and signing key; it outlives runs."),
]


@site_app.command()
def init(state_dir: StateDir) -> None:
    """Make the site's ledger signing key (kept if it exists), pin it in policy.toml and print its fingerprint."""
    with input_errors():
        fingerprint = init_site_state(state_dir.resolve())
    typer.echo(labelled("ledger key", state_dir.resolve() / PUBLIC_KEY_FILE))
    typer.echo(labelled("fingerprint", fingerprint))
    typer.echo(labelled("pinned in", state_dir.resolve() / POLICY_FILE))
    typer.echo(
        paragraph(
            f"Keep the fingerprint ({LEDGER_KEY} in {POLICY_FILE}) off this machine with your backups, and give it "
            "to your auditor out of band, to check the ledger_key.pub.pem they are later sent."
        )
    )


@site_app.command("import")
def import_(
    state_dir: StateDir,
    sources: Annotated[
        list[Path],
        typer.Argument(
            help="The coordinator's run directories (or their privacy_ledger.jsonl) holding this site's entries."
        ),
    ],
) -> None:
    """Take back, from the coordinator's run copies, the site's own signed ledger entries that
    a restore from backup lost; only entries signed by the site's key that continue its chain."""
    from client.ledger_import import import_entries

    with input_errors():
        imported = import_entries(state_dir.resolve(), sources)
    typer.echo(f"imported {imported.after - imported.before} record(s); the ledger holds {imported.after}")
    if imported.waiting:
        echo_message(
            f"error: the copies hold this site's record(s) {', '.join(str(s + 1) for s in imported.waiting)} but not "
            f"record {imported.after + 1}, which comes before them; add the run directory that holds it "
            "(docs/site.md, Backup and restore)"
        )
        raise typer.Exit(code=1)


@site_app.command("rotate-key")
def rotate_key(state_dir: StateDir) -> None:
    """Replace the site's ledger key: the ledger's last entry under the old key names the new
    one, so the chain, and `cohort audit verify` from the pinned first key, run on unbroken."""
    from client.key_rotation import rotate_key as rotate

    with input_errors():
        rotation = rotate(state_dir.resolve())
    typer.echo(
        f"{'finished the interrupted rotation' if rotation.resumed else 'rotated'} at record {rotation.sequence + 1}"
    )
    typer.echo(labelled("old key", rotation.old))
    typer.echo(labelled("new key", rotation.new))
    typer.echo(
        paragraph(
            f"The pin ({LEDGER_KEY}) stays the first key's. Back up the state directory now (an older backup holds "
            "the old key), and tell your coordinator: it binds your site's name to the key your replies carry."
        )
    )


@site_app.command()
def retire(
    state_dir: StateDir,
    archive: Annotated[
        Path, typer.Option("--archive", help="A new folder for the retired ledger, its keys and policy.")
    ],
) -> None:
    """Retire the site's dataset: a last signed record, the ledger archived where an auditor
    can verify it, and the private key deleted so that nothing more is signed."""
    from client.retirement import retire as retire_dataset

    with input_errors():
        retired = retire_dataset(state_dir.resolve(), archive.resolve())
    typer.echo(f"retired: {retired.records} record(s), the last one the retirement; the private key is deleted")
    typer.echo(labelled("archive", retired.archive))
    typer.echo(paragraph("Verify it (and keep the fingerprint you pinned beside it):"))
    typer.echo(f"cohort audit verify {retired.archive} --public-key {retired.first_key}")


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
