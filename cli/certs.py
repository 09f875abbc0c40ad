"""`cohort certs`: the TLS and SuperNode-authentication files of a real Flower deployment."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.errors import input_errors
from cli.terminal import labelled, paragraph
from common.errors import CohortInputError
from deploy.certificates import (
    CertificateLayout,
    CheckedFile,
    check_ca,
    check_registered_public_key,
    check_server_files,
    check_site_key,
    create_site_key,
    describe_names,
    init_certificates,
    subject_alternative_names,
)
from deploy.commands import (
    SITE_NAME,
    certs_site_command,
    connect_command,
    register_command,
    shell_line,
    superlink_command,
    supernode_command,
)

console = Console()

certs_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help=(
        "TLS and SuperNode authentication for a Flower deployment.\n\n"
        "cohort certs init DIR --superlink-host HOST: the CA and the SuperLink's certificate.\n\n"
        "cohort certs site DIR NAME: a site's SuperNode key pair.\n\n"
        "cohort certs check DIR: preflight before starting Flower."
    ),
)

DirectoryArgument = Annotated[Path, typer.Argument(help="The certificates directory.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace files that already exist.")]


@certs_app.command("init")
def init(
    directory: DirectoryArgument,
    superlink_host: Annotated[
        list[str],
        typer.Option(
            "--superlink-host", help="A name or IP address SuperNodes and flwr use to reach the SuperLink (repeatable)."
        ),
    ],
    days: Annotated[int, typer.Option("--days", help="How long the certificates are valid.")] = 365,
    ca_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-passphrase-file",
            help="A file whose first line is the passphrase that encrypts ca.key; without it, you are asked.",
        ),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Create a CA and the SuperLink's TLS certificate, valid for the hosts given (and 127.0.0.1, localhost).

    ca.key is written encrypted with a passphrase, from --ca-passphrase-file or asked for
    in the terminal."""
    with input_errors():
        names = describe_names(subject_alternative_names(superlink_host))
        init_certificates(
            directory, superlink_host, passphrase=_ca_passphrase(ca_passphrase_file), days=days, force=force
        )
        checked = check_server_files(directory, superlink_host)
    layout = CertificateLayout(directory)
    _print_files("wrote", directory, checked)
    _say(
        f"SANs written: {names} (127.0.0.1 and localhost for the coordinator's own flwr, SuperExec and front door; "
        "sites dial a host you gave)"
    )
    _say(
        f"{layout.ca_key} is encrypted with your passphrase; only "
        "`cohort certs init` needs it: keep it off the SuperLink's host."
    )
    _print_step(
        "On the coordinator's host (it needs ca.crt, superlink.crt and superlink.key): the SuperLink on loopback and "
        "the front door that sites reach:",
        shell_line(superlink_command(certs_dir=directory.absolute())),
    )
    _print_step(
        "On the same host, so that flwr reaches the SuperLink on loopback (the front door refuses flwr):",
        shell_line(connect_command(ca_cert=layout.ca_cert.absolute())),
    )
    _print_step(
        "Send ca.crt to each site. Each site makes its own SuperNode key pair and sends back only NAME.pub:",
        shell_line(certs_site_command()),
    )
    _print_step(
        "For each NAME.pub received, on the coordinator's host:", shell_line(register_command(f"{SITE_NAME}.pub"))
    )
    console.print()
    _say(
        "Replace each <PLACEHOLDER>; <SUPERLINK_DATABASE> is a file that keeps the registered SuperNodes across "
        "restarts, <CONNECTION> a name of your choosing."
    )


@certs_app.command("site")
def site(
    directory: DirectoryArgument,
    name: Annotated[str, typer.Argument(help="The site's name: letters, digits, '-', '_', '.'.")],
    force: ForceOption = False,
) -> None:
    """At the site: create its SuperNode key pair. NAME.key stays here; NAME.pub goes to the
    coordinator, who registers it (the SuperLink admits only registered SuperNodes)."""
    layout = CertificateLayout(directory)
    with input_errors():
        create_site_key(directory, name, force=force)
        checked = check_site_key(layout.site_key(name))
    _print_files("wrote", directory, checked)
    _print_step(
        f"Send {layout.site_public_key(name)} to the coordinator "
        f"({name}.key never leaves this machine); on its host it runs:",
        shell_line(register_command(f"{name}.pub", name)),
    )
    _print_step(
        f"Then, here, with the coordinator's ca.crt copied to {layout.ca_cert}:",
        shell_line(
            supernode_command(ca_cert=layout.ca_cert.absolute(), auth_key=layout.site_key(name).absolute(), name=name)
        ),
    )
    console.print()
    _say("Replace each <PLACEHOLDER>; <SUPERLINK_HOST> is the coordinator's public address.")


@certs_app.command("check")
def check(
    directory: DirectoryArgument,
    superlink_host: Annotated[
        list[str] | None,
        typer.Option("--superlink-host", help="A host the SuperLink's certificate must cover (repeatable)."),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option("--site", help="At a site: check only what its machine has, ca.crt and the site's key pair."),
    ] = None,
) -> None:
    """Check the files before starting Flower: exit 2 naming the first problem and its fix."""
    layout = CertificateLayout(directory)
    with input_errors():
        if site is None:
            checked = check_server_files(directory, superlink_host or [])
            checked += [row for each in layout.site_names() for row in check_registered_public_key(directory, each)]
        elif superlink_host:
            raise CohortInputError(
                "--superlink-host checks superlink.crt, which a site does not have; drop it when checking with --site"
            )
        else:
            checked = check_ca(layout.ca_cert) + check_site_key(layout.site_key(site))
    _print_files("OK", directory, checked)


def _ca_passphrase(path: Path | None) -> bytes:
    """From the file's first line, or asked twice in a terminal; never from an argument,
    which other users could read in the process list."""
    if path is not None:
        try:
            lines = path.read_bytes().splitlines()
        except OSError as error:
            raise CohortInputError(
                f"--ca-passphrase-file {path} cannot be read ({error.strerror}); give a readable file"
            ) from None
        if not lines or not lines[0]:
            raise CohortInputError(
                f"--ca-passphrase-file {path} is empty; its first line must be the passphrase for ca.key"
            )
        return lines[0]
    if not sys.stdin.isatty():
        raise CohortInputError(
            "no passphrase for ca.key: give --ca-passphrase-file FILE, or run in a terminal to be asked for one"
        )
    return typer.prompt("Passphrase for ca.key", hide_input=True, confirmation_prompt=True).encode()


def _print_files(title: str, directory: Path, checked: list[CheckedFile]) -> None:
    """Files relative to the directory named above them, so that narrow terminals show them whole."""
    console.print(labelled(title, directory), markup=False, highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("checked", overflow="fold")
    for row in checked:
        table.add_row(Text(str(row.path.relative_to(directory))), Text(row.detail))
    console.print(table)


def _print_step(heading: str, text: str) -> None:
    """Commands are printed without markup or wrapping, so they paste exactly as shown."""
    console.print()
    _say(heading)
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _say(text: str) -> None:
    """Prose wrapped to the terminal, a path in it whole on a line of its own."""
    console.print(paragraph(text), markup=False, highlight=False, soft_wrap=True)
