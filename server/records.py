"""What a run records, as typed values: one line of metrics.jsonl a round (RoundRecord),
with each site's figures (SiteRound), the round's failures and rejected replies and, under
client-level DP, the server's release (CentralRelease); and summary.json (Summary).

Whatever reads a run directory reads these (plots, the summary, the fairness report, the
command's progress lines, the audit, benchmarks and tests), never the JSON by key. The JSON
is the one runs have always written: a key is left out where its value is unknown (None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from logging import WARNING
from typing import Any

from flwr.common.logger import log

from common.privacy.ledger import LedgerEntry


class Stage(StrEnum):
    """The exchanges of a round with the sites."""

    ASK = "ask"  # before round 1: does the site take part in the study, at what epsilon
    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class Failure:
    """A site that did not answer a stage of the round (no reply in time, or an error)."""

    node: int
    site: str
    stage: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        return cls(**data)


@dataclass(frozen=True)
class Rejection:
    """A reply that does not count, and why (one line, safe to log and print).

    entry: the reply's verified ledger entry, when it had one: the site spent it even
    though its update does not count (kept in the run's ledger, not in metrics.jsonl).
    """

    node: int
    site: str
    stage: str
    reason: str
    entry: LedgerEntry | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "site": self.site, "stage": self.stage, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rejection:
        return cls(**data)


@dataclass(frozen=True)
class SiteRound:
    """What a round says of one site.

    trained: an update of it passed every check and counts.
    update_norm: the L2 norm of (its update - global model).
    num_examples: the example count it reported (None: it withheld it).
    epsilon, delta, budget, noise_multiplier, sample_rate, steps: its spend, from its
        verified ledger entry (None without a DP release of its own).
    train_loss, train_accuracy, val_loss, val_accuracy: what its policy let it send.
    """

    trained: bool = False
    update_norm: float | None = None
    num_examples: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    budget: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        values = {name: value for name, value in asdict(self).items() if value is not None and name != "trained"}
        if self.trained:  # a trained site's line names its epsilon, null without DP of its own
            values.update(trained=True, epsilon=self.epsilon)
        return values

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteRound:
        return cls(**data)


@dataclass(frozen=True)
class CentralRelease:
    """The server's client-level release of a round, or why there was none.

    epsilon: the run's client-level epsilon after the round (None: no release was
        considered, as too few updates passed the checks).
    budget, delta: the run's client-level budget.
    noise_multiplier, clip_norm: the accounted sigma and the norm the updates were clipped
        to (a release only).
    """

    released: bool
    reason: str | None = None
    epsilon: float | None = None
    budget: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CentralRelease:
        return cls(**data)


@dataclass(frozen=True)
class RoundRecord:
    """One round, as a line of metrics.jsonl.

    accuracy, loss: the global model's on the server's held-out test set, after the round.
    sites: each site the round heard from, by name.
    refused: every site that has refused to train in this run so far.
    refusal_reasons: the sites that refused in this round (or in the ask before round 1),
        each with its own one-line reason.
    seconds: the round's wall time.
    client_level: the server's release (client-level DP only).
    """

    round: int
    accuracy: float
    loss: float
    sites: dict[str, SiteRound] = field(default_factory=dict)
    refused: tuple[str, ...] = ()
    failures: tuple[Failure, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    seconds: float = 0.0
    client_level: CentralRelease | None = None
    refusal_reasons: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "round": self.round,
            "global": {"loss": self.loss, "accuracy": self.accuracy},
            "sites": {name: site.to_json() for name, site in sorted(self.sites.items())},
            "refused": list(self.refused),
            "failures": [failure.to_json() for failure in self.failures],
            "rejected": [rejection.to_json() for rejection in self.rejected],
            "seconds": self.seconds,
        }
        if self.client_level is not None:
            line["client_level"] = self.client_level.to_json()
        if self.refusal_reasons:
            line["refusal_reasons"] = dict(sorted(self.refusal_reasons.items()))
        return line

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        central = data.get("client_level")
        return cls(
            round=int(data["round"]),
            accuracy=data["global"]["accuracy"],
            loss=data["global"]["loss"],
            sites={name: SiteRound.from_json(site) for name, site in data["sites"].items()},
            refused=tuple(data.get("refused", ())),
            failures=tuple(Failure.from_json(f) for f in data.get("failures", ())),
            rejected=tuple(Rejection.from_json(r) for r in data.get("rejected", ())),
            seconds=data["seconds"],
            client_level=CentralRelease.from_json(central) if central is not None else None,
            refusal_reasons=dict(data.get("refusal_reasons", {})),
        )


@dataclass
class RoundReport:
    """What a round has learnt so far, from every stage that exchanged messages with the
    sites; it becomes the round's RoundRecord when the round ends (record).

    sites: each site's figures, by name; refusals: the nodes that refused to train this
    round (out of the run from now on), by node id, and their reasons by site name;
    declined_evaluation: the nodes that declined to evaluate this round (not asked
    again in this run); ledger: the verified ledger entries of the round, as the run's
    privacy_ledger.jsonl keeps them.
    """

    server_round: int
    sites: dict[str, SiteRound] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    refusals: dict[int, str] = field(default_factory=dict)
    refusal_reasons: dict[str, str] = field(default_factory=dict)
    declined_evaluation: set[int] = field(default_factory=set)
    ledger: list[str] = field(default_factory=list)

    def reject(self, rejection: Rejection) -> None:
        log(
            WARNING,
            "Round %d: rejected %s reply of %s: %s",
            self.server_round,
            rejection.stage,
            rejection.site,
            rejection.reason,
        )
        self.rejected.append(rejection)
        if rejection.entry is not None:
            self.ledger.append(rejection.entry.to_json())

    def fail(self, failure: Failure) -> None:
        self.failures.append(failure)

    def accept(self, site: str, figures: SiteRound, entry: LedgerEntry) -> None:
        """A site's update counts: its figures, and its verified entry for the run's ledger."""
        self.sites[site] = figures
        self.ledger.append(entry.to_json())

    def validated(self, site: str, val_loss: float | None, val_accuracy: float | None) -> None:
        self.sites[site] = dataclasses.replace(
            self.sites.get(site, SiteRound()), val_loss=val_loss, val_accuracy=val_accuracy
        )

    def record(
        self, accuracy: float, loss: float, refused: list[str], seconds: float, client_level: CentralRelease | None
    ) -> RoundRecord:
        return RoundRecord(
            self.server_round,
            accuracy,
            loss,
            dict(sorted(self.sites.items())),
            tuple(refused),
            tuple(self.failures),
            tuple(self.rejected),
            round(seconds, 3),
            client_level,
            dict(self.refusal_reasons),
        )


@dataclass(frozen=True)
class SiteSummary:
    """A site over the whole run: rounds it trained in, its last spend and validation."""

    rounds_trained: int = 0
    epsilon: float | None = None
    budget: float | None = None
    delta: float | None = None
    val_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        values = {name: value for name, value in asdict(self).items() if value is not None}
        return {**values, "epsilon": self.epsilon, "budget": self.budget}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteSummary:
        return cls(**data)


@dataclass(frozen=True)
class SiteRejections:
    """A site's rejected replies over a run: how many, in which rounds, each distinct reason."""

    count: int
    rounds: tuple[int, ...]
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "rounds": list(self.rounds), "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteRejections:
        return cls(int(data["count"]), tuple(data["rounds"]), tuple(data["reasons"]))


@dataclass(frozen=True)
class Summary:
    """summary.json: a run's final figures, written last, so it exists only for a finished run.

    rounds: the last round recorded; final_accuracy, final_loss: the global model's after it.
    max_epsilon: the largest site's sample-level epsilon; client_level_epsilon: the
        server's, for runs with client-level DP (None otherwise).
    refused: the sites that refused to train; rejected: per site, its rejected replies.
    stop_reason: why the run ended before its last round ('' when it did not).
    fairness: the fairness report's across-site figures and warnings, which `cohort
        simulate` adds once it has measured them (simulations/fairness.py).
    """

    rounds: int
    final_accuracy: float | None
    final_loss: float | None
    max_epsilon: float | None
    client_level_epsilon: float | None
    sites: dict[str, SiteSummary]
    refused: tuple[str, ...]
    rejected: dict[str, SiteRejections]
    stop_reason: str
    wall_seconds: float
    fairness: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        summary = {
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in ("sites", "refused", "rejected", "fairness")
            },
            "sites": {name: site.to_json() for name, site in self.sites.items()},
            "refused": list(self.refused),
            "rejected": {name: site.to_json() for name, site in self.rejected.items()},
        }
        if self.fairness is not None:
            summary["fairness"] = self.fairness
        return summary

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        return cls(
            rounds=int(data["rounds"]),
            final_accuracy=data["final_accuracy"],
            final_loss=data["final_loss"],
            max_epsilon=data["max_epsilon"],
            client_level_epsilon=data.get("client_level_epsilon"),
            sites={name: SiteSummary.from_json(site) for name, site in data["sites"].items()},
            refused=tuple(data.get("refused", ())),
            rejected={name: SiteRejections.from_json(site) for name, site in data.get("rejected", {}).items()},
            stop_reason=data["stop_reason"],
            wall_seconds=data["wall_seconds"],
            fairness=data.get("fairness"),
        )
