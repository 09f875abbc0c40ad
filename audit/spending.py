"""The audit of privacy spending, built from ledgers alone, for a privacy officer.

It trusts no figure the coordinator reports: every epsilon is recomputed from the
releases in the sites' own signed ledgers, under three accountants. A run with
client-level DP adds the server's ledger (`server/` in the run directory), audited the
same way under the name 'server'. Distributed client-level DP's releases (Skellam noise the
sites added under secure aggregation) are accounted with the Skellam mechanism's RDP bound
(common/privacy/skellam.py) from the figures each record carries; PRV and PLD have no
Skellam mechanism, so they are not shown for them.
The report (audit.json) has this schema, version "cohort-audit/1":

    schema, source, generated_at, warnings: [str]
    sites: {name: {
        budget_epsilon, delta, releases, refusals: [str], non_private_rounds,
        epsilon_total (RDP, every run on the site's dataset), epsilon_this_run (RDP, the
        audited run's releases; null for a site ledger), accountants: {rdp, prv, pld},
        noise_multipliers, sample_rates, clip_norms, steps, mechanisms, sampling (the
        assumption each epsilon relies on, in words), chain ('verified', 'not checked:
        ...' or 'broken: ...'), epsilon_by_release: [[run_id, round, epsilon]], warnings,
        datasets: {dataset identity: {releases, epsilon_rdp}}: every dataset the site ever
        spent on (the figures above are the latest one's); more than one means the site's
        data changed, and each carries its own budget,
        studies: [every run on the site's data, audit/studies.py StudyRow's fields],
        refusal_log: [every refusal: run_id, round, when, reason]}}
    A site's state directory whose ledger holds no record yet gives no sites: nothing spent.
    empirical: null, or the run's one-run audit (audit/empirical.py, EmpiricalAudit's
        fields) with its verdict, once `cohort audit empirical` has measured it
    client_level_estimate: null, or the run's one-shot estimate of client-level epsilon
        (audit/one_shot.py, OneShotEstimate's fields) with its verdict, likewise
    fairness: null, or the run's fairness report (simulations/fairness.py)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.cross_check import AccountantComparison, compare_accountants
from audit.studies import refusals, studies
from common.errors import CohortInputError
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    PUBLIC_KEY_FILE,
    ROOT_PUBLIC_KEY_FILE,
    LedgerEntry,
    LedgerRecord,
    RecordKind,
    Sampling,
    history_of,
    load_public_key,
    read_entries,
    verify_chain,
)
from common.privacy.mechanisms import Mechanism
from common.privacy.skellam import SkellamRelease
from common.privacy.skellam import epsilon as skellam_epsilon

SCHEMA = "cohort-audit/1"
NEAR_EXHAUSTION = 0.9
# What each ledger `sampling` value assumes; an epsilon is only as true as its assumption.
SAMPLING_ASSUMPTIONS: dict[str, str] = {
    Sampling.POISSON: (
        "Poisson sampling: every example joins every step independently with probability q (Opacus' sampler)"
    ),
    Sampling.NONE: "no amplification by sampling claimed: every release counts in full (q = 1)",
}


@dataclass(frozen=True)
class SiteLedgerFile:
    """A site's ledger, and the run ids of the audited run (None: audit the whole ledger)."""

    path: Path
    run_ids: frozenset[int] | None


def find_ledgers(path: Path) -> list[SiteLedgerFile]:
    """A run directory (its sites' ledgers), a site's state directory, or a ledger file."""
    if path.is_file():
        return [SiteLedgerFile(path, None)]
    if (path / LEDGER_FILE).is_file() and (path / "config.json").is_file():
        run_ids = frozenset(e.record.run_id for e in read_entries(path / LEDGER_FILE))
        site_ledgers = sorted((path / "federation").glob(f"*/{LEDGER_FILE}")) + sorted(
            (path / "server").glob(LEDGER_FILE)
        )
        return [SiteLedgerFile(p, run_ids) for p in site_ledgers] or [SiteLedgerFile(path / LEDGER_FILE, run_ids)]
    if (path / LEDGER_FILE).is_file():
        return [SiteLedgerFile(path / LEDGER_FILE, None)]
    if (path / HEAD_FILE).is_file():  # a site that has not spent anything yet
        return []
    raise CohortInputError(
        f"{path} holds no privacy ledger; give a run directory, a site's state directory or a {LEDGER_FILE}"
    )


def audit(path: Path, site: str | None = None) -> dict[str, Any]:
    """What each site (or only `site`) has spent, per the ledgers under `path`."""
    sites: dict[str, dict[str, Any]] = {}
    for ledger in find_ledgers(path):
        entries = read_entries(ledger.path)
        names = {e.record.site for e in entries}
        for name in sorted(names if site is None else names & {site}):
            sites[name] = _audit_site([e for e in entries if e.record.site == name], ledger)
    return {
        "schema": SCHEMA,
        "source": str(path.resolve()),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sites": sites,
        "warnings": [f"{name}: {w}" for name, site in sites.items() for w in site["warnings"]],
    }


def _audit_site(entries: list[LedgerEntry], ledger: SiteLedgerFile) -> dict[str, Any]:
    records = [e.record for e in entries]
    releases = [r for r in records if r.kind == RecordKind.RELEASE]
    latest = records[-1]
    dataset = releases[-1].dataset_hash if releases else latest.dataset_hash
    on_dataset = [r for r in releases if r.dataset_hash == dataset]
    this_run = [r for r in on_dataset if ledger.run_ids is not None and r.run_id in ledger.run_ids]
    delta = latest.delta
    comparison = _accounted(on_dataset, delta)
    total = comparison.rdp
    chain = _chain_status(entries, _root_key_file(ledger.path.parent))
    warnings = list(comparison.warnings)
    non_private = sum(r.kind == RecordKind.NON_PRIVATE for r in records)
    if non_private:
        warnings.append(_non_private_warning(records, non_private))
    if total >= NEAR_EXHAUSTION * latest.budget_epsilon:
        warnings.append(f"budget close to exhaustion: epsilon {total:.3f} of {latest.budget_epsilon:g} spent")
    if chain.startswith("broken"):
        warnings.append(f"ledger chain {chain}")
    return {
        "budget_epsilon": latest.budget_epsilon,
        "delta": delta,
        "releases": len(on_dataset),
        "refusals": [r.reason for r in records if r.kind == RecordKind.REFUSAL],
        "non_private_rounds": non_private,
        "epsilon_total": total,
        "epsilon_this_run": _epsilon(this_run, delta) if ledger.run_ids is not None else None,
        "accountants": {"rdp": comparison.rdp, "prv": comparison.prv, "pld": comparison.pld},
        "noise_multipliers": sorted({r.noise_multiplier for r in on_dataset}),
        "sample_rates": sorted({r.sample_rate for r in on_dataset}),
        "clip_norms": sorted({r.clip_norm for r in on_dataset}),
        "steps": sum(r.steps for r in on_dataset),
        "mechanisms": sorted({r.mechanism for r in on_dataset}),
        "sampling": sorted({SAMPLING_ASSUMPTIONS[r.sampling] for r in on_dataset}),
        "chain": chain,
        "epsilon_by_release": [[r.run_id, r.round, r.epsilon] for r in on_dataset],
        "warnings": warnings,
        "datasets": _datasets(releases),
        "studies": [row.to_json() for row in studies(records)],
        "refusal_log": [row.to_json() for row in refusals(records)],
    }


def _datasets(releases: list[LedgerRecord]) -> dict[str, dict[str, Any]]:
    """Every dataset identity with releases, in the order first spent on, and its RDP epsilon."""
    identities = list(dict.fromkeys(r.dataset_hash for r in releases))
    return {
        identity: {
            "releases": sum(r.dataset_hash == identity for r in releases),
            "epsilon_rdp": _epsilon([r for r in releases if r.dataset_hash == identity], releases[0].delta),
        }
        for identity in identities
    }


def _accounted(releases: list[LedgerRecord], delta: float) -> AccountantComparison:
    """The releases' epsilon under each accountant that has their mechanism."""
    if _skellam(releases):
        return AccountantComparison(_epsilon(releases, delta), None, None)
    return compare_accountants(history_of(releases), delta)


def _epsilon(releases: list[LedgerRecord], delta: float) -> float:
    """The RDP epsilon of `releases`, the enforced figure."""
    if _skellam(releases):
        return skellam_epsilon([SkellamRelease.from_details(r.mechanism_details) for r in releases], delta)
    return PrivacyState(1.0, 1.0, "rdp", history_of(releases)).epsilon(delta)


def _skellam(releases: list[LedgerRecord]) -> bool:
    return any(r.mechanism == Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM for r in releases)


def _non_private_warning(records: list[LedgerRecord], rounds: int) -> str:
    if all(r.mechanism == Mechanism.CLIENT_LEVEL_DP_FEDAVG for r in records if r.kind == RecordKind.NON_PRIVATE):
        return (
            f"sent {rounds} update(s) without local DP: only the "
            "coordinator's client-level DP (its server ledger) protects them"
        )
    if all(
        r.mechanism == Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM for r in records if r.kind == RecordKind.NON_PRIVATE
    ):
        return (
            f"sent {rounds} masked update(s) with a share of the noise: the sum of all sites' shares protects them "
            "(the server ledger's distributed client-level DP)"
        )
    return f"trained without differential privacy in {rounds} round(s): those releases carry no guarantee"


def _root_key_file(state_dir: Path) -> Path:
    """The key the chain starts from: the first one, kept apart once the key was rotated."""
    root = state_dir / ROOT_PUBLIC_KEY_FILE
    return root if root.exists() else state_dir / PUBLIC_KEY_FILE


def _chain_status(entries: list[LedgerEntry], key_file: Path) -> str:
    """The site's exported key sits beside its ledger; a run directory's copy has none."""
    if not key_file.exists():
        return "not checked: no public key beside the ledger (use `cohort audit verify --public-key`)"
    problem = verify_chain(entries, load_public_key(key_file))
    return "verified" if problem is None else f"broken: {problem}"
