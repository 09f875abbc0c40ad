"""audit.html: one self-contained page (inline styles, plots as data URIs, no fetches)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def render_page(report: dict[str, Any], fairness_plot: bytes | None = None) -> str:
    """fairness_plot: the run's plots/site_accuracy.png, embedded when there is one."""
    rows = "".join(_site_row(name, site) for name, site in report["sites"].items())
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Cohort privacy audit</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child, td:last-child {{ text-align: left; }}
.warn {{ color: #a30; }}
</style></head><body>
<h1>Privacy audit</h1>
<p>Source: <code>{html.escape(report["source"])}</code>,
generated {html.escape(report["generated_at"])} ({report["schema"]}).
Every epsilon is recomputed from the sites' ledgers; RDP is the enforced figure.</p>
<table><tr><th>site</th><th>epsilon (total)</th><th>epsilon (this run)</th><th>budget</th><th>delta</th>
<th>PRV</th><th>PLD</th><th>sigma</th><th>q</th><th>C</th><th>steps</th><th>releases</th><th>refusals</th><th>chain</th>
<th>mechanism and sampling assumption</th></tr>
{rows}</table>
{_empirical_section(report["empirical"])}
{_estimate_section(report["client_level_estimate"])}
{_fairness_section(report["fairness"], fairness_plot)}
<h2>Warnings</h2><ul class="warn">{warnings}</ul>
<h2>Epsilon by release</h2>
<img alt="epsilon against releases, per site, with budgets" src="data:image/png;base64,{_epsilon_plot(report)}">
{_studies_section(report)}
</body></html>
"""


def _studies_section(report: dict[str, Any]) -> str:
    """Every study on each site's data, and every refusal with its reason, in full."""

    def cell(value: Any, pattern: str = "{}") -> str:
        return "-" if value is None else html.escape(pattern.format(value))

    rows = "".join(
        _row(
            [
                html.escape(name),
                str(study["run_id"]),
                study["first"],
                study["last"],
                str(study["rounds_trained"]),
                str(study["rounds_refused"]),
                cell(study["epsilon_granted"], "{:.3f}"),
                f"{study['epsilon_spent']:.3f}",
                cell(study["epsilon_total"], "{:.3f}"),
                cell(study["model"]),
                cell(study["fab_hash"]),
                cell(study["coordinator"]),
                cell(study["dataset"]),
            ]
        )
        for name, site in report["sites"].items()
        for study in site["studies"]
    )
    refused = "".join(
        _row([html.escape(name), str(row["run_id"]), str(row["round"]), row["when"], html.escape(row["reason"])])
        for name, site in report["sites"].items()
        for row in site["refusal_log"]
    )
    return f"""<h2>What ran on the data</h2>
<table><tr><th>site</th><th>run</th><th>first</th><th>last</th><th>rounds trained</th><th>rounds refused</th>
<th>epsilon granted</th><th>epsilon spent</th><th>running total</th><th>model</th><th>FAB SHA-256</th>
<th>coordinator</th><th>dataset</th></tr>
{rows}</table>
<h2>Refusals</h2>
<table><tr><th>site</th><th>run</th><th>round</th><th>when</th><th>reason</th></tr>
{refused or '<tr><td colspan="5">none</td></tr>'}</table>
"""


def _empirical_section(empirical: dict[str, Any] | None) -> str:
    if empirical is None:
        return ""
    claimed = (
        "none (trained without DP)"
        if empirical["accountant_epsilon"] is None
        else f"{empirical['accountant_epsilon']:.3f}"
    )
    style = ' class="warn"' if empirical["contradicts_accountant"] else ""
    return f"""<h2>Empirical privacy audit</h2>
<p>One-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023) at {html.escape(empirical["site"])}:
{empirical["canaries"]} canaries, {empirical["included"]} of them trained on.
The bound comes from {html.escape(empirical["source"])}; score: {html.escape(empirical["score"])}.</p>
<table><tr><th>guesses</th><th>right</th><th>delta</th><th>confidence</th><th>epsilon lower bound</th>
<th>accountant's epsilon</th></tr>
<tr><td>{empirical["guesses"]}</td><td>{empirical["correct"]}</td><td>{empirical["delta"]:g}</td><td>{empirical["confidence"]:.0%}</td>
<td>{empirical["epsilon_lower_bound"]:.3f}</td><td>{claimed}</td></tr></table>
<p{style}>{html.escape(empirical["verdict"])}</p>
<ul>{"".join(f"<li>{html.escape(line)}</li>" for line in empirical["scope"])}</ul>
"""


def _estimate_section(estimate: dict[str, Any] | None) -> str:
    if estimate is None:
        return ""
    claimed = f"{estimate['accountant_epsilon']:.3f}"
    style = ' class="warn"' if estimate["above_accountant"] else ""
    return f"""<h2>Client-level privacy estimate</h2>
<p>One-shot estimate (Andrew et al., ICLR 2024): {estimate["inserted"]} of {estimate["canary_clients"]} canary
clients inserted, each a random direction in the model's {estimate["dimension"]} parameters, over
{estimate["rounds"]} released round(s). The final-model figure fits a Gaussian to the canaries' cosines with the
final model's change, against N(0, 1/d); the all-iterates figure fits their largest cosine with one round's change,
against that of {estimate["held_out"]} directions never inserted.</p>
<table><tr><th>observer</th><th>canaries' cosines</th><th>null</th><th>delta</th><th>estimated epsilon</th>
<th>server ledger's epsilon</th></tr>
<tr><td>final model</td><td>N({estimate["final_mean"]:.5f}, {estimate["final_std"]:.5f}&sup2;)</td>
<td>N(0, {estimate["dimension"] ** -0.5:.5f}&sup2;)</td><td>{estimate["delta"]:g}</td>
<td>{estimate["epsilon_final"]:.3f}</td><td>{claimed}</td></tr>
<tr><td>all iterates</td><td>N({estimate["iterates_mean"]:.5f}, {estimate["iterates_std"]:.5f}&sup2;)</td>
<td>N({estimate["null_mean"]:.5f}, {estimate["null_std"]:.5f}&sup2;)</td><td>{estimate["delta"]:g}</td>
<td>{estimate["epsilon_all_iterates"]:.3f}</td><td>{claimed}</td></tr>
<tr><td>low end (compared with the ledger)</td><td>mean at its one-sided 95% low end, spread the null's</td>
<td>N(0, {estimate["dimension"] ** -0.5:.5f}&sup2;)</td><td>{estimate["delta"]:g}</td>
<td>{estimate["epsilon_low_end"]:.3f}</td><td>{claimed}</td></tr></table>
<p{style}>{html.escape(estimate["verdict"])}</p>
<ul>{"".join(f"<li>{html.escape(line)}</li>" for line in estimate["scope"])}</ul>
"""


def _fairness_section(fairness: dict[str, Any] | None, plot: bytes | None) -> str:
    if fairness is None:
        return ""
    across = fairness["across_sites"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{site['accuracy']:.3f}</td>"
        f"<td>{site['accuracy_ci'][0]:.3f} to {site['accuracy_ci'][1]:.3f}</td><td>{site['loss']:.3f}</td>"
        f"<td>{site['train_examples']}</td><td>{site['val_examples']}</td>"
        f"<td>{' '.join(str(c) for c in site['label_mix'])}</td></tr>\n"
        for name, site in fairness["sites"].items()
    )
    classes = " ".join("-" if a is None else f"{a:.2f}" for a in fairness["test_accuracy_by_class"])
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in fairness["warnings"])
    image = (
        ""
        if plot is None
        else (
            '<img alt="validation accuracy by site and round, worst site highlighted" '
            f'src="data:image/png;base64,{base64.b64encode(plot).decode()}">'
        )
    )
    ratio = "-" if across["worst_over_best"] is None else f"{across['worst_over_best']:.3f}"
    return f"""<h2>Who the model works for</h2>
<p>{html.escape(fairness["model"])}; exact 95% intervals.</p>
<table><tr><th>site</th><th>accuracy</th><th>95% interval</th><th>loss</th><th>train examples</th><th>val examples</th>
<th>train examples per class</th></tr>
{rows}</table>
<p>Worst {html.escape(across["worst_site"])} {across["worst"]:.3f},
best {html.escape(across["best_site"])} {across["best"]:.3f},
mean {across["mean"]:.3f}, spread {across["spread"]:.3f}, standard deviation {across["std"]:.3f}, worst/best {ratio}.
Test accuracy by class: {classes}.</p>
{warnings}{image}
"""


def _site_row(name: str, site: dict[str, Any]) -> str:
    def number(value: Any, pattern: str = "{:.3f}") -> str:
        return "-" if value is None else pattern.format(value)

    cells = [
        html.escape(name),
        number(site["epsilon_total"]),
        number(site["epsilon_this_run"]),
        number(site["budget_epsilon"], "{:g}"),
        number(site["delta"], "{:g}"),
        number(site["accountants"]["prv"]),
        number(site["accountants"]["pld"]),
        ", ".join(f"{s:.3f}" for s in site["noise_multipliers"]) or "-",
        ", ".join(f"{q:.3f}" for q in site["sample_rates"]) or "-",
        ", ".join(f"{c:g}" for c in site["clip_norms"]) or "-",
        str(site["steps"]),
        str(site["releases"]),
        str(len(site["refusals"])),
        html.escape(site["chain"].split(":")[0]),
        html.escape("; ".join(site["mechanisms"] + site["sampling"])) or "-",
    ]
    return _row(cells)


def _row(cells: list[str]) -> str:
    """One table row of cells already escaped."""
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>\n"


def _epsilon_plot(report: dict[str, Any]) -> str:
    figure, axes = plt.subplots(figsize=(7, 4.2))
    plotted = False
    for name, site in report["sites"].items():
        epsilons = [e for _, _, e in site["epsilon_by_release"]]
        if epsilons:
            plotted = True
            line = axes.plot(range(1, len(epsilons) + 1), epsilons, "-o", markersize=3, label=name)[0]
            axes.axhline(site["budget_epsilon"], color=line.get_color(), linestyle=":", alpha=0.7)
    axes.set(xlabel="release (round, over every run)", ylabel="epsilon", title="Epsilon spent (dotted: budget)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if plotted:
        axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()
