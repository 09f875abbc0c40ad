"""`cohort audit`: what each dataset has spent, and whether its ledger is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from cli.errors import input_errors
from common.privacy.ledger import LEDGER_FILE, key_fingerprint, load_public_key, read_entries, verify_chain
from common.rundir import write_bytes_atomic, write_json_atomic

console = Console()


class _SummaryByDefault(TyperGroup):
    """`cohort audit PATH` runs the summary; `cohort audit verify PATH` the check."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["summary", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_SummaryByDefault,
    no_args_is_help=True,
    help=(
        "Audit privacy spending from the sites' ledgers.\n\n"
        "cohort audit PATH: per-site summary, audit.json and audit.html (PATH: a run directory, a site's "
        "state directory or a privacy_ledger.jsonl).\n\n"
        "cohort audit verify PATH --public-key KEY: check every link and signature."
    ),
)


@audit_app.command("summary", hidden=True)
def summary(
    path: Annotated[Path, typer.Argument(help="A run directory, a site's state directory, or a privacy_ledger.jsonl.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where audit.json and audit.html go (default: beside the ledger).")] = None,
) -> None:
    """Per site: epsilon spent in this run and in total against its budget, and warnings."""
    # Imported here: the accountants load torch, which `cohort`'s other commands do not need.
    from common.privacy.audit import audit
    from common.privacy.audit_page import render_page

    with input_errors():
        report = audit(path)
    target = out or (path if path.is_dir() else path.parent)
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "audit.json", report)
    write_bytes_atomic(target / "audit.html", render_page(report).encode())
    _print_report(report)
    console.print(f"wrote {target / 'audit.json'} and {target / 'audit.html'}", highlight=False)


@audit_app.command("verify")
def verify(
    path: Annotated[Path, typer.Argument(help="A site's privacy_ledger.jsonl or its state directory.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The site's exported ledger_key.pub.pem.")],
) -> None:
    """Check every chain link and signature; exit 1 naming the first bad record."""
    ledger = path / LEDGER_FILE if path.is_dir() else path
    with input_errors():
        entries = read_entries(ledger)
        key = load_public_key(public_key)
        problem = verify_chain(entries, key)
    if problem is not None:
        typer.echo(f"FAILED: {ledger}: {problem}", err=True)
        raise typer.Exit(code=1)
    console.print(f"verified: {len(entries)} record(s) in {ledger}, every link and signature intact", highlight=False)
    console.print(f"signed by key {key_fingerprint(key)}: compare with the fingerprint the site gave you", highlight=False)


def _print_report(report: dict[str, Any]) -> None:
    table = Table(title="Privacy spent, recomputed from the ledgers (RDP enforced; PRV and PLD cross-check)")
    for column in ("site", "total", "this run", "budget", "delta", "PRV", "PLD", "sigma", "q", "C", "refusals", "chain"):
        table.add_column(column, justify="left" if column in ("site", "chain") else "right")
    for name, site in report["sites"].items():
        this_run = site["epsilon_this_run"]
        table.add_row(
            name,
            f"{site['epsilon_total']:.3f}",
            "-" if this_run is None else f"{this_run:.3f}",
            f"{site['budget_epsilon']:g}",
            f"{site['delta']:g}",
            "-" if site["accountants"]["prv"] is None else f"{site['accountants']['prv']:.3f}",
            f"{site['accountants']['pld']:.3f}",
            ", ".join(f"{s:.3f}" for s in site["noise_multipliers"]) or "-",
            ", ".join(f"{q:.3f}" for q in site["sample_rates"]) or "-",
            ", ".join(f"{c:g}" for c in site["clip_norms"]) or "-",
            str(len(site["refusals"])),
            site["chain"].split(":")[0],
        )
    console.print(table)
    assumptions: dict[str, list[str]] = {}
    for name, site in report["sites"].items():
        if site["sampling"]:
            assumptions.setdefault("; ".join(site["mechanisms"] + site["sampling"]), []).append(name)
    for assumption, names in assumptions.items():
        console.print(f"{', '.join(names)}: {assumption}", highlight=False, markup=False)
    for name, site in report["sites"].items():
        for identity, spent in site["datasets"].items():
            console.print(f"{name}: dataset {identity[:16]}: {spent['releases']} release(s), epsilon {spent['epsilon_rdp']:.3f} (RDP)", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if not report["warnings"]:
        console.print("no warnings")
