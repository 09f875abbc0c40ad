"""`cohort audit`: what each dataset has spent, and whether its ledger is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from cli.errors import input_errors
from cli.terminal import paragraph
from common.privacy.ledger import LEDGER_FILE, key_fingerprint, load_public_key, read_entries, verify_chain
from common.private_files import private_dir
from server.rundir import RunDirectory, write_bytes_atomic, write_json_atomic

console = Console()


class _SummaryByDefault(TyperGroup):
    """`cohort audit PATH` runs the summary; `cohort audit verify PATH` the check."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["summary", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    rich_markup_mode="markdown",
    cls=_SummaryByDefault,
    no_args_is_help=True,
    help=(
        "Audit privacy spending from the sites' ledgers.\n\n"
        "cohort audit PATH: per-site summary, audit.json and audit.html (PATH: a run directory, a site's "
        "state directory or a privacy_ledger.jsonl).\n\n"
        "cohort audit verify PATH --public-key KEY: check every link and signature.\n\n"
        "cohort audit empirical RUN_DIR: measure an epsilon lower bound with the run's canaries."
    ),
)


@audit_app.command("summary", hidden=True)
def summary(
    path: Annotated[Path, typer.Argument(help="A run directory, a site's state directory, or a privacy_ledger.jsonl.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where audit.json and audit.html go (default: beside the ledger).")
    ] = None,
) -> None:
    """Per site: epsilon spent in this run and in total against its budget, and warnings."""
    # Imported here: the accountants load torch, which `cohort`'s other commands do not need.
    from audit.empirical import saved_audit, verdict
    from audit.page import render_page
    from audit.spending import audit
    from simulations.fairness import PLOT_FILE, read_fairness

    with input_errors():
        report = audit(path)
        empirical = saved_audit(path) if path.is_dir() else None
        fairness = read_fairness(path) if path.is_dir() else None
    report["empirical"] = None if empirical is None else {**empirical.to_json(), "verdict": verdict(empirical)}
    report["fairness"] = fairness
    report["warnings"] += [] if fairness is None else fairness["warnings"]
    plot = path / "plots" / PLOT_FILE
    fairness_plot = plot.read_bytes() if fairness is not None and plot.is_file() else None
    target = out or (path if path.is_dir() else path.parent)
    private_dir(target)
    write_json_atomic(target / "audit.json", report)
    write_bytes_atomic(target / "audit.html", render_page(report, fairness_plot).encode())
    _print_report(report)
    if path.is_dir():
        _print_rejections(RunDirectory(path))
    console.print(
        paragraph(f"wrote {target / 'audit.json'} and {target / 'audit.html'}"),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


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
    console.print(
        f"signed by key {key_fingerprint(key)}: compare with the fingerprint the site gave you", highlight=False
    )


@audit_app.command("empirical")
def empirical(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory of a run with --set audit-canaries=M.")],
    guesses: Annotated[
        int | None,
        typer.Option("--guesses", help="r: how many canaries to guess, half 'in', half 'out' (default m/4)."),
    ] = None,
) -> None:
    """One-run audit (Steinke et al. 2023): an epsilon lower bound beside the accountant's.

    Exits 1 if the bound exceeds the accountant's epsilon: the DP implementation is broken.
    """
    from audit.empirical import EMPIRICAL_AUDIT_FILE, audit_run, verdict

    with input_errors():
        result = audit_run(run_dir, guesses)
    write_json_atomic(run_dir / EMPIRICAL_AUDIT_FILE, result.to_json())
    console.print(f"{result.site}: {result.canaries} canaries, {result.included} trained on", highlight=False)
    console.print(paragraph(f"bound from {result.source}"), highlight=False, markup=False)
    console.print(paragraph(f"score: {result.score}"), highlight=False, markup=False)
    console.print(f"guessed {result.guesses}: {result.correct} right", highlight=False)
    console.print(verdict(result), style="bold red" if result.contradicts_accountant else None, highlight=False)
    for line in result.scope:
        console.print(paragraph(line), highlight=False, markup=False)
    console.print(
        paragraph(f"wrote {run_dir / EMPIRICAL_AUDIT_FILE} ({result.seconds:.1f} s)"),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if result.contradicts_accountant:
        raise typer.Exit(code=1)


def _print_report(report: dict[str, Any]) -> None:
    """Two narrow tables rather than one wide one, so an 80-column terminal or CI log
    shows every figure whole."""
    spent = Table(title="Epsilon spent, from the ledgers (RDP enforced)", box=box.SIMPLE_HEAD)
    for column in ("site", "total", "this run", "budget", "PRV", "PLD", "chain"):
        spent.add_column(column, justify="left" if column in ("site", "chain") else "right", no_wrap=column != "site")
    mechanism = Table(title="Mechanism, per site", box=box.SIMPLE_HEAD)
    for column in ("site", "delta", "sigma", "q", "C", "steps", "refusals"):
        mechanism.add_column(column, justify="left" if column == "site" else "right", no_wrap=column != "site")
    for name, site in report["sites"].items():
        spent.add_row(
            name,
            _epsilon(site, site["epsilon_total"]),
            _epsilon(site, site["epsilon_this_run"]),
            f"{site['budget_epsilon']:g}",
            _epsilon(site, site["accountants"]["prv"]),
            _epsilon(site, site["accountants"]["pld"]),
            site["chain"].split(":")[0],
        )
        mechanism.add_row(
            name,
            f"{site['delta']:g}",
            ", ".join(f"{s:.3f}" for s in site["noise_multipliers"]) or "-",
            ", ".join(f"{q:.3f}" for q in site["sample_rates"]) or "-",
            ", ".join(f"{c:g}" for c in site["clip_norms"]) or "-",
            str(site["steps"]),
            str(len(site["refusals"])),
        )
    console.print(spent)
    console.print(mechanism)
    assumptions: dict[str, list[str]] = {}
    for name, site in report["sites"].items():
        if site["sampling"]:
            assumptions.setdefault("; ".join(site["mechanisms"] + site["sampling"]), []).append(name)
    for assumption, names in assumptions.items():
        console.print(f"{', '.join(names)}: {assumption}", highlight=False, markup=False)
    for name, site in report["sites"].items():
        for identity, spent in site["datasets"].items():
            console.print(
                f"{name}: dataset {identity[:16]}: {spent['releases']} "
                f"release(s), epsilon {spent['epsilon_rdp']:.3f} (RDP)",
                highlight=False,
            )
    if report["empirical"] is not None:
        console.print(f"empirical audit: {report['empirical']['verdict']}", highlight=False)
        console.print(paragraph(f"bound from {report['empirical']['source']}"), highlight=False, markup=False)
        for line in report["empirical"]["scope"]:
            console.print(paragraph(line), highlight=False, markup=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if not report["warnings"]:
        console.print("no warnings")


def _epsilon(site: dict[str, Any], value: float | None) -> str:
    """A site that trained without DP has no finite epsilon, whatever its releases sum to."""
    if site["non_private_rounds"]:
        return "no DP"
    return "-" if value is None else f"{value:.3f}"


def _print_rejections(run_dir: RunDirectory) -> None:
    """The run view: replies the server's checks rejected, per site, with their reasons."""
    from server.summary import rejections

    for name, rejected in rejections(run_dir.read_metrics()).items():
        rounds = ", ".join(map(str, rejected.rounds))
        console.print(
            f"rejected: {name}: {rejected.count} reply(ies), round(s) {rounds}: {'; '.join(rejected.reasons)}",
            highlight=False,
            markup=False,
        )
