"""`cohort site init`: a site's ledger key, made by the site's own command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import input_errors
from cli.terminal import labelled, paragraph
from common.privacy.ledger import PUBLIC_KEY_FILE
from deploy.launch import init_site_state

site_app = typer.Typer(
    rich_markup_mode="markdown", help="A site's own state: its ledger key and head.", no_args_is_help=True
)


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
