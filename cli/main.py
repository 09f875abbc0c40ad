"""`cohort`: simulate a federation on one machine, deploy one across sites, audit what it spent."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.audit import audit_app
from cli.certs import certs_app
from cli.compare import compare
from cli.deploy import connect, front_door, run, superlink, supernode
from cli.errors import input_errors
from cli.rounds import round_line
from cli.service import service_app
from cli.site import site_app
from cli.terminal import echo_message, labelled
from common.errors import CohortInputError
from deploy.flower_runtime import require_app_dir
from server.records import RoundRecord, Summary
from server.rundir import RunDirectory, write_json_atomic
from simulations.plan import DEFAULT_SIMULATION, SimulationPlan, load_plan, saved_plan

if TYPE_CHECKING:
    from simulations.runner import SimulationOutcome

app = typer.Typer(
    rich_markup_mode="markdown",
    help="Cohort: federated training with differential privacy, on Flower and Opacus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


app.add_typer(audit_app, name="audit")
app.add_typer(certs_app, name="certs")
app.add_typer(service_app, name="service")
app.add_typer(site_app, name="site")


@app.callback()
def _root() -> None:
    """Cohort: federated training with differential privacy, on Flower and Opacus."""


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Argument(help="Simulation TOML (default: simulations/default.toml).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: --set rounds=5 (repeatable).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this run directory at its next round.")
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where new run directories are created.")] = Path("runs"),
    federation_home: Annotated[
        Path | None,
        typer.Option(
            "--federation-home",
            help="Sites' state (ledgers, keys, policy.toml): share one to make budgets span simulations.",
        ),
    ] = None,
) -> None:
    """Simulate a federation of sites on this machine on Flower's simulation engine."""
    with input_errors():  # the settings first: a mistake in them is told before torch loads
        require_app_dir()
        if resume is not None and (config is not None or set_ or federation_home is not None):
            raise CohortInputError(
                "--resume continues a run with its own config; drop CONFIG, --set and --federation-home"
            )
        settings = load_plan(config or DEFAULT_SIMULATION, set_ or []) if resume is None else resume
    # Imported here: the simulation engine loads torch, which the deployment commands do not need.
    from simulations.runner import SimulationStopped, new_run, resumed_run

    try:
        with input_errors():
            if isinstance(settings, Path):
                plan = resumed_run(settings, lambda d: saved_plan(d, RunDirectory(d).read_config()))
            else:
                plan = new_run(settings, runs_dir, federation_home)
            outcome = _run_with_progress(plan)
    except KeyboardInterrupt:
        echo_message("interrupted: every process this run started has been stopped")
        raise typer.Exit(code=130) from None
    except SimulationStopped as stopped:
        echo_message(f"{stopped}: every process this run started has been stopped")
        raise typer.Exit(code=128 + stopped.signum) from None
    if outcome.summary is None:
        echo_message(f"error: the run failed; Flower's log is in {outcome.log_file}")
        raise typer.Exit(code=1)
    _print_summary(outcome)
    _report_fairness(outcome, plan.run.fairness_margin)
    if not outcome.succeeded:
        echo_message(f"error: the run {outcome.summary.stop_reason}")
        raise typer.Exit(code=1)


def _run_with_progress(plan: SimulationPlan) -> SimulationOutcome:
    from server.held_out import federated_split
    from simulations.divergence import advice, divergence
    from simulations.runner import run_simulation

    rounds = plan.run.training.rounds
    num_classes = federated_split(plan.run.data).num_classes
    seen: list[RoundRecord] = []
    warned = False
    # Shown once the run directory is locked and ready, so that a refusal prints nothing else.
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("starting Flower", total=rounds)

    def on_start(run_dir: RunDirectory) -> None:
        progress.console.print(labelled("run directory", run_dir.path), highlight=False, markup=False, soft_wrap=True)
        progress.start()

    def on_round(record: RoundRecord) -> None:
        nonlocal warned
        progress.console.print(round_line(record, rounds), highlight=False)
        progress.update(task, completed=record.round, description="training")
        seen.append(record)
        reason = None if warned else divergence(seen, num_classes)
        if reason is not None:
            warned = True
            progress.console.print(f"[bold yellow]warning:[/] {advice(reason)}", highlight=False)

    try:
        return run_simulation(plan, on_round=on_round, on_start=on_start)
    finally:
        if progress.live.is_started:
            progress.stop()


# Above this many sites the summary describes the federation instead of listing it.
SITE_TABLE_LIMIT = 20


def _print_summary(outcome: SimulationOutcome) -> None:
    summary = outcome.summary
    if summary is None or not summary.sites:
        return
    client_level = summary.client_level_epsilon is not None
    if len(summary.sites) > SITE_TABLE_LIMIT:
        _print_federation(summary, client_level)
    else:
        _print_site_table(outcome.run_dir.path.name, summary, client_level)
    if summary.refused:
        console.print(f"refused to train (out of the run): {', '.join(summary.refused)}", highlight=False)
    for name, rejected in summary.rejected.items():
        console.print(
            f"rejected: {name}, {rejected.count} reply(ies) in round(s) {', '.join(map(str, rejected.rounds))}: "
            f"{'; '.join(rejected.reasons)}",
            highlight=False,
            markup=False,
        )
    max_eps, client_eps = summary.max_epsilon, summary.client_level_epsilon
    privacy = f"largest site epsilon {'n/a (no DP)' if max_eps is None else f'{max_eps:.3f}'}"
    if client_level:
        privacy = f"client-level epsilon {client_eps:.3f} (server ledger)"
    console.print(
        f"global test accuracy {summary.final_accuracy:.4f} after {summary.rounds} rounds; {privacy}", highlight=False
    )
    console.print(labelled("run directory", outcome.run_dir.path), highlight=False, markup=False, soft_wrap=True)


def _print_site_table(title: str, summary: Summary, client_level: bool) -> None:
    table = Table(title=f"Cohort run: {title}")
    for column in ("site", "rounds trained", "val accuracy", "epsilon", "budget", "delta"):
        table.add_column(column, justify="right" if column != "site" else "left")
    for name, site in summary.sites.items():
        table.add_row(
            name,
            str(site.rounds_trained),
            _fmt(site.val_accuracy),
            _fmt(site.epsilon, "{:.3f}", "client DP" if client_level else "no DP"),
            _fmt(site.budget, "{:g}", "-"),
            _fmt(site.delta, "{:g}", "-"),
        )
    console.print(table)


def _print_federation(summary: Summary, client_level: bool) -> None:
    """Many small sites: one device's validation accuracy on a handful of examples says
    little, so the spread across sites is what is shown."""
    sites = list(summary.sites.values())
    rounds = sorted(site.rounds_trained for site in sites)
    console.print(
        f"{len(sites)} sites; rounds trained per site: min {rounds[0]}, "
        f"median {rounds[len(rounds) // 2]}, max {rounds[-1]}",
        highlight=False,
    )
    epsilons = sorted(site.epsilon for site in sites if site.epsilon is not None)
    if epsilons:
        console.print(f"site epsilon: min {epsilons[0]:.3f}, max {epsilons[-1]:.3f}", highlight=False)
    elif client_level:
        console.print(
            "every site is protected by the server's client-level DP (its ledger), not by local noise", highlight=False
        )


def _report_fairness(outcome: SimulationOutcome, margin: float) -> None:
    """Score the final model on every site's own data; record it in summary.json too."""
    from simulations.fairness import write_fairness

    if outcome.summary is None or not outcome.summary.sites:
        return
    try:
        report = write_fairness(outcome.run_dir.path, margin)
    except CohortInputError as error:  # the run itself stands; only its report is missing
        console.print(f"[yellow]warning:[/] no fairness report: {error}", highlight=False)
        return
    fairness = {**report["across_sites"], "warnings": report["warnings"]}
    write_json_atomic(outcome.run_dir.summary_file, dataclasses.replace(outcome.summary, fairness=fairness).to_json())
    across = report["across_sites"]
    console.print(
        f"by site: worst {across['worst_site']} {across['worst']:.3f}, best {across['best_site']} "
        f"{across['best']:.3f}, spread {across['spread']:.3f}, std {across['std']:.3f}",
        highlight=False,
    )
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _fmt(value: Any, pattern: str = "{:.4f}", missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


app.command()(compare)
for deployment_command in (superlink, front_door, supernode, connect, run):
    app.command()(deployment_command)


def main() -> None:
    app(prog_name="cohort")


if __name__ == "__main__":
    main()
