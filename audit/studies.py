"""What ran on a site's data: every study (a run, as the site's ledger records it) and
every refusal, for the privacy officer who asks.

A study's figures come from the site's own signed records: its dates, the rounds it trained
and was refused, the code (the FAB's hash) and model it ran, the coordinator it answered,
the epsilon the site granted it, what it spent (how far it raised the dataset's running
total) and the running total after it. Records written before the site recorded grants,
FABs, models or coordinators show those as unknown (None).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from common.privacy.ledger import LedgerRecord, RecordKind


@dataclass(frozen=True)
class StudyRow:
    """One study at one site. spent: how far the study raised its dataset's running total
    (epsilons compose, they do not add: this is the difference of totals); total: the
    dataset's running total after the study's last release (None: it released nothing)."""

    run_id: int
    first: float
    last: float
    rounds_trained: int
    rounds_refused: int
    fab_hash: str | None
    model: str | None
    coordinator: str | None
    dataset: str | None
    epsilon_granted: float | None
    epsilon_spent: float
    epsilon_total: float | None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "first": _iso(self.first), "last": _iso(self.last)}


@dataclass(frozen=True)
class RefusalRow:
    run_id: int
    round: int
    when: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "when": _iso(self.when)}


def studies(records: list[LedgerRecord]) -> list[StudyRow]:
    """Every run in the ledger, in the order it first appears."""
    totals: dict[str, float] = {}  # each dataset's running total so far
    rows = []
    for run_id in dict.fromkeys(r.run_id for r in records):
        mine = [r for r in records if r.run_id == run_id]
        releases = [r for r in mine if r.kind == RecordKind.RELEASE]
        dataset = releases[-1].dataset_hash if releases else None
        before = totals.get(dataset, 0.0) if dataset else 0.0
        if releases and dataset:
            totals[dataset] = releases[-1].epsilon
        rows.append(
            StudyRow(
                run_id=run_id,
                first=min(r.timestamp for r in mine),
                last=max(r.timestamp for r in mine),
                rounds_trained=sum(r.kind != RecordKind.REFUSAL for r in mine),
                rounds_refused=sum(r.kind == RecordKind.REFUSAL for r in mine),
                fab_hash=_known(r.fab_hash or _refused_fab(r) for r in mine),
                model=_known(r.model for r in mine),
                coordinator=_known(r.coordinator for r in mine),
                dataset=dataset,
                epsilon_granted=max((r.study_epsilon for r in mine if r.study_epsilon), default=None),
                epsilon_spent=releases[-1].epsilon - before if releases else 0.0,
                epsilon_total=releases[-1].epsilon if releases else None,
            )
        )
    return rows


def refusals(records: list[LedgerRecord]) -> list[RefusalRow]:
    return [RefusalRow(r.run_id, r.round, r.timestamp, r.reason) for r in records if r.kind == RecordKind.REFUSAL]


def _refused_fab(record: LedgerRecord) -> str:
    """A site that refused a run's code records the FAB's hash in place of the config's."""
    return record.config_hash.removeprefix("fab:") if record.config_hash.startswith("fab:") else ""


def _known(values: Any) -> str | None:
    found = [v for v in values if v]
    return found[-1] if found else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
