"""`cohort audit`: what each dataset has spent, and whether its ledger is intact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from cli.errors import input_errors
from cli.terminal import echo_message, labelled, paragraph
from common.privacy.ledger import load_public_key
from common.private_files import private_dir
from server.rundir import RunDirectory, write_bytes_atomic, write_json_atomic
from server.site_book import key_changes

if TYPE_CHECKING:
    from audit.one_shot import OneShotEstimate

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
        "cohort audit verify STATE_DIR --public-key KEY: check the pinned key, every link and signature, the "
        "signed head and, with --run-dir, the coordinator's copies.\n\n"
        "cohort audit empirical RUN_DIR: measure an epsilon lower bound with the run's canaries, or estimate "
        "client-level epsilon with its canary clients."
    ),
)


@audit_app.command("summary", hidden=True)
def summary(
    path: Annotated[Path, typer.Argument(help="A run directory, a site's state directory, or a privacy_ledger.jsonl.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where audit.json and audit.html go (default: a run directory itself; for a site, "
            "audit-NAME in the current directory, never its state directory).",
        ),
    ] = None,
) -> None:
    """Per site: every study on its data, epsilon spent in this run and in total against its budget,
    refusals, warnings."""
    # Imported here: the accountants load torch, which `cohort`'s other commands do not need.
    from audit import one_shot
    from audit.empirical import saved_audit, verdict
    from audit.page import render_page
    from audit.spending import audit
    from simulations.fairness import PLOT_FILE, read_fairness

    with input_errors():
        report = audit(path)
        empirical = saved_audit(path) if path.is_dir() else None
        estimate = one_shot.saved_estimate(path) if path.is_dir() else None
        fairness = read_fairness(path) if path.is_dir() else None
    report["empirical"] = None if empirical is None else {**empirical.to_json(), "verdict": verdict(empirical)}
    report["client_level_estimate"] = (
        None if estimate is None else {**estimate.to_json(), "verdict": one_shot.verdict(estimate)}
    )
    report["fairness"] = fairness
    report["warnings"] += [] if fairness is None else fairness["warnings"]
    report["warnings"] += key_changes(path) if path.is_dir() else []
    plot = path / "plots" / PLOT_FILE
    fairness_plot = plot.read_bytes() if fairness is not None and plot.is_file() else None
    target = private_dir(out or _default_out(path))
    write_json_atomic(target / "audit.json", report)
    write_bytes_atomic(target / "audit.html", render_page(report, fairness_plot).encode())
    if not report["sites"]:
        console.print(
            f"nothing spent: the ledger in {path} holds no record yet", highlight=False, markup=False, soft_wrap=True
        )
    else:
        _print_studies(report)
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
    path: Annotated[Path, typer.Argument(help="A site's state directory (or its privacy_ledger.jsonl).")],
    public_key: Annotated[
        Path,
        typer.Option("--public-key", help="The site's first ledger key (ledger_key.root.pub.pem once rotated)."),
    ],
    fingerprint: Annotated[
        str | None,
        typer.Option("--fingerprint", help="The key's fingerprint as the site gave it (default: its policy's pin)."),
    ] = None,
    copies: Annotated[
        list[Path] | None,
        typer.Option(
            "--run-dir",
            help="A coordinator's run directory: its copies of this site's entries must be in the ledger (repeatable).",
        ),
    ] = None,
) -> None:
    """Check the pinned key, every chain link and signature, the signed head, and the
    coordinator's copies; exit 1 naming the first thing wrong."""
    from audit.ledger_verification import LedgerFailed, verify_site_ledger

    with input_errors():
        key = load_public_key(public_key)
        try:
            verified = verify_site_ledger(path, key, fingerprint, copies or [])
        except LedgerFailed as failed:
            echo_message(f"FAILED: {failed}")
            raise typer.Exit(code=1) from None
    console.print(
        paragraph(
            f"verified: {verified.records} record(s) in {path}, every link, signature and the signed head intact"
        ),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    console.print(labelled("signed by key", verified.fingerprint), highlight=False, markup=False, soft_wrap=True)
    if verified.pinned_by == "no pin":
        console.print("no pin to compare with: compare the key with the fingerprint the site gave you", highlight=False)
    else:
        console.print(labelled("matches the pin", verified.pinned_by), highlight=False, markup=False, soft_wrap=True)
    if verified.retired:
        console.print(f"the dataset was retired at record {verified.records}: no record follows", highlight=False)
    if verified.rotations:
        console.print(f"the key was rotated {verified.rotations} time(s), each rotation signed by the key before it")
    if copies:
        console.print(
            f"{verified.compared} entry(ies) in the coordinator's copies, each in the ledger", highlight=False
        )


@audit_app.command("empirical")
def empirical(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run directory of a run with --set audit-canaries=M (or audit-canary-clients=K)."
        ),
    ],
    guesses: Annotated[
        int | None,
        typer.Option("--guesses", help="r: how many canaries to guess, half 'in', half 'out' (default m/4)."),
    ] = None,
) -> None:
    """One-run audit (Steinke et al. 2023): an epsilon lower bound beside the accountant's;
    with canary clients, the one-shot estimate of client-level epsilon (Andrew et al. 2024).

    Exits 1 if the bound exceeds the accountant's epsilon: the DP implementation is broken.
    An estimate above it is reported, but proves nothing.
    """
    from audit.empirical import EMPIRICAL_AUDIT_FILE, audit_run, verdict
    from audit.one_shot import ONE_SHOT_FILE, estimate_run

    with input_errors():
        data = RunDirectory(run_dir).read_config().data
        estimate = estimate_run(run_dir) if data.audit_canary_clients else None
        result = audit_run(run_dir, guesses) if data.audit_canaries or estimate is None else None
    if estimate is not None:
        write_json_atomic(run_dir / ONE_SHOT_FILE, estimate.to_json())
        _print_estimate(estimate)
        console.print(
            paragraph(f"wrote {run_dir / ONE_SHOT_FILE} ({estimate.seconds:.1f} s)"),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if result is None:
        return
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


def _print_estimate(estimate: OneShotEstimate) -> None:
    """The one-shot estimate, its fits and what it is, each line within 80 columns."""
    from audit.one_shot import verdict

    lines = [
        (
            f"client-level estimate (Andrew et al. 2024): {estimate.inserted} of {estimate.canary_clients} canary "
            f"clients inserted, {estimate.rounds} released round(s), d = {estimate.dimension}"
        ),
        (
            f"final model: cosines N({estimate.final_mean:.5f}, {estimate.final_std:.5f}^2) against "
            f"N(0, {estimate.dimension**-0.5:.5f}^2)"
        ),
        (
            f"all iterates: largest cosine a round N({estimate.iterates_mean:.5f}, {estimate.iterates_std:.5f}^2) "
            f"against {estimate.held_out} held-out directions' N({estimate.null_mean:.5f}, {estimate.null_std:.5f}^2)"
        ),
        "low end: the final model's, the mean cosine at its one-sided 95% low end and the spread the null's",
    ]
    for line in lines:
        console.print(paragraph(line), highlight=False, markup=False)
    console.print(
        paragraph(verdict(estimate)),
        style="bold yellow" if estimate.above_accountant else None,
        highlight=False,
        markup=False,
    )
    if estimate.unclipped:
        console.print(
            paragraph(
                f"warning: {estimate.unclipped} canary update(s) arrived below their round's clip norm: clipping did "
                "not set their size, and the estimate's premise fails"
            ),
            highlight=False,
            markup=False,
        )
    for line in estimate.scope:
        console.print(paragraph(line), highlight=False, markup=False)


def _default_out(path: Path) -> Path:
    """A run directory keeps its audit; a site's audit goes to the current directory, not
    beside the site's signing key."""
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return Path.cwd() / f"audit-{(path if path.is_dir() else path.parent).resolve().name}"


def _print_studies(report: dict[str, Any]) -> None:
    """What ran on each site's data, one study a row, and every refusal with its reason;
    the FAB hashes and coordinators in full are in audit.json and audit.html."""
    for name, site in report["sites"].items():
        table = Table(title=f"Studies on {name}'s data", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for column in ("run", "when (UTC)", "rounds", "refused", "granted", "spent", "total"):
            table.add_column(column, justify="left" if column in ("run", "when (UTC)") else "right", no_wrap=True)
        for study in site["studies"]:
            table.add_row(
                _short(str(study["run_id"]), 9),
                _span(study["first"], study["last"]),
                str(study["rounds_trained"]),
                str(study["rounds_refused"]),
                "-" if study["epsilon_granted"] is None else f"{study['epsilon_granted']:.3f}",
                f"{study['epsilon_spent']:.3f}",
                "-" if study["epsilon_total"] is None else f"{study['epsilon_total']:.3f}",
            )
        console.print(table)
        code = Table(
            title=f"Code and coordinator of each study at {name}",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for column in ("run", "model", "FAB", "coordinator"):
            code.add_column(column, no_wrap=column != "coordinator")
        for study in site["studies"]:
            code.add_row(
                _short(str(study["run_id"]), 9),
                study["model"] or "-",
                _short(study["fab_hash"] or "-", 12),
                study["coordinator"] or "-",
            )
        console.print(code)
        for refusal in site["refusal_log"]:
            when = refusal["when"][:16].replace("T", " ")
            line = (
                f"refused: run {_short(str(refusal['run_id']), 9)} round {refusal['round']} ({when}): "
                f"{refusal['reason']}"
            )
            console.print(paragraph(line), highlight=False, markup=False)


def _span(first: str, last: str) -> str:
    """'2026-12-01 06:38-06:42' within a day, else both dates and times."""
    start, end = first[:16].replace("T", " "), last[:16].replace("T", " ")
    return f"{start}-{end[11:]}" if start[:10] == end[:10] else f"{start} - {end[5:]}"


def _short(text: str, width: int) -> str:
    """The head of an id, enough to tell studies apart at 80 columns (in full in audit.json)."""
    return text if len(text) <= width else text[: width - 1] + "…"


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
    if report["client_level_estimate"] is not None:
        console.print(
            paragraph(f"client-level estimate: {report['client_level_estimate']['verdict']}"),
            highlight=False,
            markup=False,
        )
        for line in report["client_level_estimate"]["scope"]:
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
