"""`cohort site import`: a restored site recovers the ledger entries it lost from the
coordinator's run copies.

Every train reply carries the site's signed ledger entry, and the coordinator keeps each
one it accepts in its run directory's privacy_ledger.jsonl. Those entries are the site's
own, signed by its key: a site whose state directory was restored from an older backup
takes back, verbatim, those that continue its chain. Nothing the coordinator could have
made is imported: an entry must verify under the site's key and link to the one before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.policy import pinned_ledger_key
from common.errors import CohortInputError
from common.privacy.ledger import GENESIS_HASH, LEDGER_FILE, LedgerEntry, SiteLedger, read_entries, verify_signature


@dataclass(frozen=True)
class Imported:
    """before, after: how many records the site's ledger held; waiting: the site's signed
    entries in the copies that could not be linked (a record between is in none of them)."""

    before: int
    after: int
    waiting: tuple[int, ...]


def import_entries(state_dir: Path, sources: list[Path]) -> Imported:
    """Append to the site's ledger, in order, its own entries found in `sources` (run
    directories or ledger files) that continue its chain."""
    ledger = SiteLedger(state_dir, create_key=False, pinned_key=pinned_ledger_key(state_dir))
    held = ledger.verified_entries()
    offered = _own_entries(ledger, sources)
    following: list[LedgerEntry] = []
    last_hash = held[-1].entry_hash() if held else GENESIS_HASH
    sequence = len(held)
    while sequence in offered and offered[sequence].previous_hash == last_hash:
        following.append(offered[sequence])
        last_hash = offered[sequence].entry_hash()
        sequence += 1
    if following:
        ledger.extend(following)
    return Imported(len(held), sequence, tuple(sorted(s for s in offered if s > sequence)))


def _own_entries(ledger: SiteLedger, sources: list[Path]) -> dict[int, LedgerEntry]:
    """The entries signed by the site's key in every source, by sequence; two different
    ones at one sequence mean two histories, which an import must not choose between."""
    found: dict[int, LedgerEntry] = {}
    keys = ledger.signing_keys()
    for source in sources:
        path = source / LEDGER_FILE if source.is_dir() else source
        for entry in read_entries(path):
            if not any(verify_signature(entry, key) for key in keys):
                continue
            other = found.setdefault(entry.sequence, entry)
            if other.entry_hash() != entry.entry_hash():
                raise CohortInputError(
                    f"{path} holds a record {entry.sequence + 1} signed by this site that differs from another copy's: "
                    "the site's ledger forked; reconcile by hand (docs/site.md, Backup and restore)"
                )
    return found
