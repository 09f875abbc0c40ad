"""`cohort certs`: the TLS and SuperNode-authentication files of a real Flower deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.errors import input_errors
from common.errors import CohortInputError
from deploy.certificates import (
    CertificateLayout,
    CheckedFile,
    check_ca,
    check_server_files,
    check_site_key,
    create_site_key,
    describe_names,
    init_certificates,
    subject_alternative_names,
)
from deploy.commands import (
    SUPERLINK_PORT,
    certs_site_command,
    connect_command,
    register_command,
    shell_line,
    superlink_command,
    supernode_command,
)

console = Console()

certs_app = typer.Typer(
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
        typer.Option("--superlink-host", help="A name or IP address SuperNodes and flwr use to reach the SuperLink (repeatable)."),
    ],
    days: Annotated[int, typer.Option("--days", help="How long the certificates are valid.")] = 365,
    force: ForceOption = False,
) -> None:
    """Create a CA and the SuperLink's TLS certificate, valid for the hosts given (and 127.0.0.1)."""
    with input_errors():
        init_certificates(directory, superlink_host, days=days, force=force)
        checked = check_server_files(directory, superlink_host)
        names = describe_names(subject_alternative_names(superlink_host))
    layout = CertificateLayout(directory)
    _print_files("wrote", directory, checked)
    console.print(f"SANs written: {names} (127.0.0.1 for the SuperLink's own SuperExec; SuperNodes and flwr must dial one of them)", markup=False, highlight=False)
    _print_step(
        "On the SuperLink machine (it needs ca.crt, superlink.crt and superlink.key; keep ca.key away from it):",
        shell_line(superlink_command(certs_dir=directory.absolute())),
    )
    _print_step(
        "On the coordinator, so that flwr reaches the SuperLink over TLS:",
        shell_line(connect_command(superlink=f"{superlink_host[0]}:{SUPERLINK_PORT}", ca_cert=layout.ca_cert.absolute())),
    )
    _print_step("Then, for each site:", shell_line(certs_site_command(directory)))
    console.print(
        "\nReplace each <PLACEHOLDER>; <SUPERLINK_DATABASE> is a file that keeps the registered SuperNodes across restarts, "
        "<CONNECTION> a name of your choosing.",
        markup=False,
        highlight=False,
    )


@certs_app.command("site")
def site(
    directory: DirectoryArgument,
    name: Annotated[str, typer.Argument(help="The site's name: letters, digits, '-', '_', '.'.")],
    force: ForceOption = False,
) -> None:
    """Create a site's SuperNode key pair: the SuperLink admits only registered ones."""
    layout = CertificateLayout(directory)
    with input_errors():
        create_site_key(directory, name, force=force)
        checked = check_site_key(layout.site_key(name))
    _print_files("wrote", directory, checked)
    _print_step("On the coordinator, register the site's SuperNode:", shell_line(register_command(layout.site_public_key(name).absolute())))
    _print_step(
        f"Send {name}.key (privately) and ca.crt to the site; its operator runs:",
        shell_line(supernode_command(ca_cert=layout.ca_cert.absolute(), auth_key=layout.site_key(name).absolute(), name=name)),
    )
    console.print("\nReplace each <PLACEHOLDER>; <CONNECTION> is the name given to `cohort connect`.", markup=False, highlight=False)


@certs_app.command("check")
def check(
    directory: DirectoryArgument,
    superlink_host: Annotated[
        Optional[list[str]],
        typer.Option("--superlink-host", help="A host the SuperLink's certificate must cover (repeatable)."),
    ] = None,
    site: Annotated[
        Optional[str],
        typer.Option("--site", help="Check only what this site's machine has: ca.crt and the site's key."),
    ] = None,
) -> None:
    """Check the files before starting Flower: exit 2 naming the first problem and its fix."""
    layout = CertificateLayout(directory)
    with input_errors():
        if site is None:
            checked = check_server_files(directory, superlink_host or [])
            checked += [row for each in layout.site_names() for row in check_site_key(layout.site_key(each))]
        elif superlink_host:
            raise CohortInputError("--superlink-host checks superlink.crt, which a site does not have; drop it when checking with --site")
        else:
            checked = check_ca(layout.ca_cert) + check_site_key(layout.site_key(site))
    _print_files("OK", directory, checked)


def _print_files(title: str, directory: Path, checked: list[CheckedFile]) -> None:
    """Files relative to the directory named in the title, so that narrow terminals show them whole."""
    table = Table(title=Text(f"{title}: {directory}"), title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("checked", overflow="fold")
    for row in checked:
        table.add_row(Text(str(row.path.relative_to(directory))), Text(row.detail))
    console.print(table)


def _print_step(heading: str, text: str) -> None:
    """Commands are printed without markup or wrapping, so they paste exactly as shown."""
    console.print(f"\n{heading}", markup=False, highlight=False)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
