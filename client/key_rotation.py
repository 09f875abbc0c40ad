"""`cohort site rotate-key`: a new ledger key, with continuity.

The ledger's last entry under the old key names the new one (LedgerEntry.next_key), so
the chain runs on unbroken: an auditor who pinned the first key verifies every record
ever written by following each rotation, each signed by the key before it. The pin (the
first key's fingerprint) stays as it is. The old private key is replaced: whoever copied
it can no longer sign anything the chain accepts after the rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.policy import pinned_ledger_key
from common.errors import CohortInputError
from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger, key_fingerprint


@dataclass(frozen=True)
class Rotation:
    """old, new: the fingerprints of the key before and after; sequence: the rotation
    entry's place in the ledger; resumed: a rotation a crash had interrupted, completed."""

    old: str
    new: str
    sequence: int
    resumed: bool


def rotate_key(state_dir: Path) -> Rotation:
    ledger = SiteLedger(state_dir, create_key=False, pinned_key=pinned_ledger_key(state_dir))
    old = key_fingerprint(ledger.public_key)
    if ledger.finish_rotation():
        return Rotation(old, key_fingerprint(ledger.public_key), len(ledger.entries()) - 1, resumed=True)
    entries = ledger.verified_entries()
    if not entries:
        raise CohortInputError(
            f"the ledger in {state_dir} is empty: nothing was signed with its key yet; to start with another key, "
            "move the state directory away and run `cohort site init` (then pin the new fingerprint)"
        )
    reason = f"ledger key {old} retired by its operator; the next key is in this entry"
    entry = ledger.rotate(LedgerRecord.about_the_ledger(RecordKind.KEY_ROTATION, entries[-1].record, reason))
    return Rotation(old, key_fingerprint(ledger.public_key), entry.sequence, resumed=False)
