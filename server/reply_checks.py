"""Every reply is checked before it counts.

A site's reply is untrusted input: it may be broken (NaN after a diverged step, a model
of another shape) or hostile (another site's name, a replayed or rewritten ledger entry,
an update boosted to replace the global model). Each check here turns one such reply into
a `Rejection` with a one-line reason instead of an exception or a poisoned model:

- who: the node speaks for its registered name, or the one it first claimed, with that
  name's ledger key (server.site_registry);
- what it spent: the signed ledger entry verifies against that key and chain, is for this
  run and round, matches the run's DP mechanism and hashes the arrays it came with;
- what it sent: the same array names, shapes and dtypes as the global model, all finite.

The norm bound, which depends on the whole round, is the DP policy's, applied by the
collect stage (server.collect) once every reply of the round is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from common import protocol
from common.privacy.ledger import LedgerEntry, LedgerRecord, RecordKind, model_hash
from common.secure_aggregation.messages import MASKED_INPUT
from common.secure_aggregation.messages import Stage as SecureStage
from server.records import Rejection, SiteRound, Stage
from server.run_config import RunConfig
from server.site_registry import SiteRegistry
from server.strategies import STRATEGIES

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_OPTIONAL_TRAIN_METRICS = {protocol.TRAIN_LOSS: "train_loss", protocol.TRAIN_ACCURACY: "train_accuracy"}
_OPTIONAL_EVAL_METRICS = {protocol.VAL_LOSS: "val_loss", protocol.VAL_ACCURACY: "val_accuracy"}
_REASON_CHARS = 300
# A ledger record field's annotation -> the values a reply's entry may hold in it.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


@dataclass
class Update:
    """An accepted training reply: the site's arrays, its update's norm and its verified entry."""

    reply: Message
    node: int
    site: str
    arrays: ArrayRecord
    norm: float
    entry: LedgerEntry
    reported_examples: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    norm_bit: int | None = None  # client-side adaptive clipping: whether the site clipped

    def site_record(self) -> SiteRound:
        """What metrics.jsonl says of this site's round: its spend comes from the signed entry."""
        return _site_round(self.entry, round(self.norm, 6), self.reported_examples, self.metrics)


@dataclass
class MaskedContribution:
    """An accepted secure-aggregation input: who sent it and its verified ledger entry,
    which binds the masked input; the update itself stays hidden, and so does its norm."""

    node: int
    site: str
    entry: LedgerEntry
    reported_examples: int | None
    metrics: dict[str, float] = field(default_factory=dict)

    def site_record(self) -> SiteRound:
        return _site_round(self.entry, None, self.reported_examples, self.metrics)


def _site_round(
    entry: LedgerEntry, norm: float | None, reported_examples: int | None, metrics: dict[str, float]
) -> SiteRound:
    """What metrics.jsonl says of a site that contributed: its spend comes from its signed entry."""
    figures = SiteRound(
        trained=True,
        update_norm=norm,
        num_examples=reported_examples,
        train_loss=metrics.get("train_loss"),
        train_accuracy=metrics.get("train_accuracy"),
    )
    spent = entry.record
    if spent.kind != RecordKind.RELEASE:
        return figures
    return dataclasses.replace(
        figures,
        epsilon=spent.epsilon,
        delta=spent.delta,
        budget=spent.budget_epsilon,
        noise_multiplier=spent.noise_multiplier,
        sample_rate=spent.sample_rate,
        steps=spent.steps,
    )


@dataclass(frozen=True)
class SiteEvaluation:
    node: int
    site: str
    metrics: dict[str, float]


class ReplyChecker:
    """Checks replies of one run against the global model and the site registry."""

    def __init__(self, run: RunConfig, run_id: int, registry: SiteRegistry) -> None:
        self.run = run
        self.run_id = run_id
        self.registry = registry

    def check_train(
        self, server_round: int, reply: Message, global_arrays: ArrayRecord, live_nodes: set[int]
    ) -> Update | Rejection:
        node = reply.metadata.src_node_id
        try:
            return self._check_train(server_round, reply, node, global_arrays, live_nodes)
        except _Rejected as rejected:
            return Rejection(
                node,
                self.registry.known_as(node),
                Stage.TRAIN,
                one_line(str(rejected)),
                rejected.entry,
            )

    def check_masked(
        self, server_round: int, node: int, reply: Message, live_nodes: set[int]
    ) -> MaskedContribution | Rejection:
        """A secure-aggregation input: who sent it and a ledger entry that binds it. What it
        holds cannot be checked here; the protocol checks its form, and the sum's bound."""
        try:
            name, site = self._admitted(reply, node, live_nodes)
            masked = reply.content.array_records.get(MASKED_INPUT)
            if masked is None:
                raise _Rejected(f"sent no '{MASKED_INPUT}' ArrayRecord")
            entry = self._verified_entry(server_round, name, _text(site, protocol.SITE_LEDGER_ENTRY), masked)
            self.registry.accept(name, entry)
            metrics = reply.content.metric_records.get(protocol.METRICS)
            return MaskedContribution(
                node, name, entry, _reported_examples(metrics), _optional_metrics(metrics, _OPTIONAL_TRAIN_METRICS)
            )
        except _Rejected as rejected:
            return Rejection(
                node,
                self.registry.known_as(node),
                SecureStage.MASKED_INPUT,
                one_line(str(rejected)),
                rejected.entry,
            )

    def check_evaluate(self, reply: Message, live_nodes: set[int]) -> SiteEvaluation | Rejection:
        node = reply.metadata.src_node_id
        try:
            if not reply.has_content():
                raise _Rejected("sent an evaluation reply without content")
            name = self._claimed_name(reply)
            problem = self.registry.claim_problem(node, name, live_nodes)
            if problem is not None:
                raise _Rejected(problem)
            metrics = reply.content.metric_records.get(protocol.METRICS)
            return SiteEvaluation(node, name, _optional_metrics(metrics, _OPTIONAL_EVAL_METRICS))
        except _Rejected as rejected:
            return Rejection(node, self.registry.known_as(node), Stage.EVALUATE, one_line(str(rejected)))

    def _check_train(
        self, server_round: int, reply: Message, node: int, global_arrays: ArrayRecord, live_nodes: set[int]
    ) -> Update:
        name, site = self._admitted(reply, node, live_nodes)
        arrays = reply.content.array_records.get(protocol.ARRAYS)
        if arrays is None:
            raise _Rejected(f"sent no '{protocol.ARRAYS}' ArrayRecord")
        entry = self._verified_entry(server_round, name, _text(site, protocol.SITE_LEDGER_ENTRY), arrays)
        self.registry.accept(name, entry)
        try:
            norm = update_norm(arrays, global_arrays)
        except _Rejected as rejected:
            rejected.entry = entry
            raise
        metrics = reply.content.metric_records.get(protocol.METRICS)
        reported = _reported_examples(metrics)
        bit = metrics.get(KEY_NORM_BIT) if metrics is not None else None
        norm_bit = int(bit) if isinstance(bit, int) and bit in (0, 1) else None
        dp = self.run.dp
        if (
            norm_bit is None
            and dp.client_level
            and self.run.central_dp.clipping_side == "client"
            and dp.client_clipping == "adaptive"
        ):
            exc = _Rejected(
                f"sent no clipping bit ('{KEY_NORM_BIT}' 0 or 1), which client-side adaptive clipping needs"
            )
            exc.entry = entry
            raise exc
        kept = _optional_metrics(metrics, _OPTIONAL_TRAIN_METRICS)
        if STRATEGIES[self.run.aggregation.strategy].needs_train_loss and "train_loss" not in kept:
            exc = _Rejected(
                f"sent no finite '{protocol.TRAIN_LOSS}', which {STRATEGIES[self.run.aggregation.strategy].title} "
                "weighs by (a site's policy may withhold it)"
            )
            exc.entry = entry
            raise exc
        return Update(reply, node, name, arrays, norm, entry, reported, kept, norm_bit)

    def _admitted(self, reply: Message, node: int, live_nodes: set[int]) -> tuple[str, Any]:
        """The name a training reply claims and its site record, once the registry admits
        the node under that name and ledger key."""
        if not reply.has_content():
            raise _Rejected("sent a training reply without content")
        name = self._claimed_name(reply)
        site = reply.content.config_records[protocol.SITE]
        problem = self.registry.admit(node, name, _text(site, protocol.SITE_LEDGER_KEY), live_nodes)
        if problem is not None:
            raise _Rejected(problem)
        return name, site

    def _claimed_name(self, reply: Message) -> str:
        site = reply.content.config_records.get(protocol.SITE)
        if site is None:
            raise _Rejected(f"sent no '{protocol.SITE}' record naming the site")
        name = _text(site, protocol.SITE_NAME)
        if not _SITE_NAME.fullmatch(name):
            raise _Rejected(f"claims the name {name[:40]!r}, which is not a site name (letters, digits, '.', '_', '-')")
        return name

    def _verified_entry(self, server_round: int, name: str, text: str, arrays: ArrayRecord) -> LedgerEntry:
        entry = parse_entry(text)
        problem = self.registry.check_entry(name, entry) or self._entry_mismatch(
            server_round, name, entry.record, arrays
        )
        if problem is not None:
            raise _Rejected(problem)
        return entry

    def _entry_mismatch(self, server_round: int, name: str, record: LedgerRecord, arrays: ArrayRecord) -> str | None:
        mechanism = self.run.dp.mechanism
        expected_kind, expected_mechanism = (
            (RecordKind.RELEASE if mechanism.site_noise else RecordKind.NON_PRIVATE),
            mechanism.mechanism,
        )
        if record.site != name:
            return f"its ledger entry is {record.site!r}'s, not {name}'s"
        if (record.run_id, record.round) != (self.run_id, server_round):
            return (
                f"its ledger entry is for run {record.run_id} round "
                f"{record.round}, not run {self.run_id} round {server_round}"
            )
        if (record.kind, record.mechanism) != (expected_kind, expected_mechanism):
            return (
                f"its ledger entry records a {record.kind} by {record.mechanism}; "
                f"this run needs a {expected_kind} by {expected_mechanism}"
            )
        if record.kind == RecordKind.RELEASE and not (
            record.noise_multiplier > 0 and 0 < record.sample_rate <= 1 and record.steps >= 1 and record.epsilon >= 0
        ):
            return "its ledger entry records a release without noise, sampling or steps"
        if record.config_hash != self.run.site_fingerprint():
            return "its ledger entry was made under another run config"
        if self.run.dp.mechanism.server_noise and self.run.central_dp.clipping_side == "client":
            return None  # Flower's clipping mod clips the arrays after the site signed what it trained
        try:
            sent_hash = model_hash(arrays)
        except Exception as error:  # noqa: BLE001 - any decoding failure of untrusted bytes is a bad reply
            return f"sent arrays that do not decode ({type(error).__name__})"
        if record.model_hash != sent_hash:
            return "its ledger entry's model hash is not the hash of the arrays it sent"
        return None


def check_arrays(arrays: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
    """None when `arrays` has the global model's names, shapes and dtypes, all finite."""
    names, expected = list(arrays.keys()), list(global_arrays.keys())
    if set(names) != set(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        return f"sent arrays that do not match the model (missing {missing[:3]}, extra {extra[:3]})"
    for name in expected:
        reference = global_arrays[name]
        try:
            value = arrays[name].numpy()
        except Exception as error:  # noqa: BLE001 - any decoding failure of untrusted bytes is a bad reply
            return f"sent array {name} that does not decode ({type(error).__name__})"
        if value.shape != tuple(reference.shape) or str(value.dtype) != reference.dtype:
            return (
                f"sent array {name} as {value.dtype}{list(value.shape)}, the model has "
                f"{reference.dtype}{list(reference.shape)}"
            )
        if not np.isfinite(value).all():
            return f"sent array {name} with NaN or infinite values"
    return None


def update_norm(arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """L2 norm of (reply - global model) over every array, after check_arrays passes."""
    problem = check_arrays(arrays, global_arrays)
    if problem is not None:
        raise _Rejected(problem)
    total = 0.0
    for name, reference in global_arrays.items():
        delta = arrays[name].numpy().astype(np.float64) - reference.numpy().astype(np.float64)
        total += float(np.square(delta).sum())
    return math.sqrt(total)


def parse_entry(text: str) -> LedgerEntry:
    """A ledger entry from a reply, every field of the type the format says, or _Rejected."""
    try:
        entry = LedgerEntry.from_json(text)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise _Rejected("sent a ledger entry that is not a ledger record") from None
    for spec in dataclasses.fields(LedgerRecord):
        value = getattr(entry.record, spec.name)
        kind = _FIELD_TYPES[str(spec.type)]
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise _Rejected(f"sent a ledger entry whose {spec.name} is not a {spec.type}")
    return entry


def one_line(text: str) -> str:
    """A site-supplied text as one printable line of bounded length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _REASON_CHARS else flat[: _REASON_CHARS - 3] + "..."


class _Rejected(Exception):
    """Raised inside a check; turned into a Rejection at its boundary."""

    entry: LedgerEntry | None = None


def _text(record: Any, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise _Rejected(f"sent no text '{key}' in its site record")
    return value


def _reported_examples(metrics: Any) -> int | None:
    """The example count a reply reports, when it is a count (a site may withhold it)."""
    examples = metrics.get(protocol.NUM_EXAMPLES) if metrics is not None else None
    return (
        int(examples)
        if isinstance(examples, (int, float))
        and not isinstance(examples, bool)
        and math.isfinite(examples)
        and examples >= 1
        else None
    )


def _optional_metrics(metrics: Any, names: dict[str, str]) -> dict[str, float]:
    """Metrics a site may withhold by its policy: kept when present and finite, else left out."""
    if metrics is None:
        return {}
    kept = {}
    for key, name in names.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            kept[name] = float(value)
    return kept
