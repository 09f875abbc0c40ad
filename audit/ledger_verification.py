"""`cohort audit verify`: whether a site's ledger is whole, under the key the auditor pinned.

A ledger verifies when its key is the one pinned (the fingerprint the auditor recorded out
of band, or the site policy's ledger-key), every link and signature holds under it, its
signed head names its last record, and it holds every entry of the site's that the
coordinator's run copies hold: a state directory restored from an older backup verifies
on its own and is caught by the last check alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.policy import pinned_ledger_key
from common.privacy.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    LedgerEntry,
    RecordKind,
    chain_keys,
    key_fingerprint,
    ledger_problem,
    read_entries,
    verify_signature,
)


class LedgerFailed(Exception):
    """The ledger does not verify; the message names the first thing wrong."""


@dataclass(frozen=True)
class VerifiedLedger:
    """records: how many; fingerprint: the first key's (the one given); pinned_by: where the
    pin came from; compared: how many of the site's entries the coordinator's copies held;
    rotations: how many times the key was rotated since, each signed by the key before;
    retired: whether the ledger ends with its dataset's retirement."""

    records: int
    fingerprint: str
    pinned_by: str
    compared: int
    rotations: int
    retired: bool


def verify_site_ledger(
    path: Path, key: Ed25519PublicKey, fingerprint: str | None, copies: list[Path]
) -> VerifiedLedger:
    """Raises LedgerFailed naming what does not hold; CohortInputError for a path that is
    not a site's ledger."""
    ledger = path / LEDGER_FILE if path.is_dir() else path
    state_dir = ledger.parent
    pinned, pinned_by = _pin(state_dir, fingerprint)
    if pinned is not None and key_fingerprint(key) != pinned:
        raise LedgerFailed(
            f"{ledger}: the key given is {key_fingerprint(key)}, not the pinned {pinned} ({pinned_by}): "
            "the ledger was re-signed with another key, or the wrong key was sent"
        )
    entries = [] if path.is_dir() and not ledger.exists() else read_entries(ledger)
    problem = ledger_problem(ledger, state_dir / HEAD_FILE, key)
    if problem is not None:
        raise LedgerFailed(f"{ledger} {problem}")
    compared = 0
    keys = chain_keys(entries, key)
    for copy in copies:
        for entry in _site_entries(copy, keys):
            compared += 1
            if entry.sequence >= len(entries) or entries[entry.sequence].entry_hash() != entry.entry_hash():
                raise LedgerFailed(
                    f"{ledger} lacks record {entry.sequence + 1} "
                    f"(run {entry.record.run_id}, round {entry.record.round}) "
                    f"that the site signed and {copy} holds: the state directory was restored from an older backup "
                    "or cut short (the site imports it with `cohort site import`)"
                )
    retired = bool(entries) and entries[-1].record.kind == RecordKind.RETIREMENT
    return VerifiedLedger(len(entries), key_fingerprint(key), pinned_by, compared, len(keys) - 1, retired)


def _pin(state_dir: Path, fingerprint: str | None) -> tuple[str | None, str]:
    if fingerprint is not None:
        return fingerprint, "--fingerprint"
    pinned = pinned_ledger_key(state_dir)
    return (pinned, f"ledger-key in {state_dir}/policy.toml") if pinned else (None, "no pin")


def _site_entries(copy: Path, keys: list[Ed25519PublicKey]) -> list[LedgerEntry]:
    """The entries signed by one of the site's `keys` in a coordinator's run copy (which
    holds every site's)."""
    entries = read_entries(copy / LEDGER_FILE if copy.is_dir() else copy)
    return [entry for entry in entries if any(verify_signature(entry, key) for key in keys)]
