"""`cohort site retire`: a dataset's last ledger record, an archive an auditor can verify,
and a site that signs nothing more.

The retirement is a signed record at the ledger's end (after it the site refuses every
round); the ledger, its signed head, its public keys and the policy that pins the first
key are copied to the archive; then the private key is deleted, so nothing can be added
to the chain, by the site or by whoever later reads its disk. The archive verifies with
`cohort audit verify ARCHIVE --public-key ARCHIVE/<first key>` like a live state directory.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from client.policy import POLICY_FILE, pinned_ledger_key
from common.errors import CohortInputError
from common.privacy.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    ROOT_PUBLIC_KEY_FILE,
    LedgerBroken,
    LedgerRecord,
    RecordKind,
    SiteLedger,
)
from common.private_files import private_dir

ARCHIVED_FILES = (LEDGER_FILE, HEAD_FILE, PUBLIC_KEY_FILE, ROOT_PUBLIC_KEY_FILE, POLICY_FILE)


@dataclass(frozen=True)
class Retirement:
    """records: the archived ledger's length; first_key: the file the chain starts from."""

    records: int
    archive: Path
    first_key: Path


def retire(state_dir: Path, archive: Path) -> Retirement:
    """Retire the site's dataset; running it again after a crash finishes what is left."""
    if archive.exists() and any(archive.iterdir()):
        raise CohortInputError(f"--archive {archive} is not empty; give a new folder for the retired ledger")
    ledger = SiteLedger(state_dir, create_key=False, pinned_key=pinned_ledger_key(state_dir))
    try:
        entries = ledger.verified_entries()
    except LedgerBroken:
        entries = ledger.entries()
        if not entries or entries[-1].record.kind != RecordKind.RETIREMENT:
            raise
    else:
        if not entries:
            raise CohortInputError(
                f"the ledger in {state_dir} is empty: the site never trained, there is nothing to retire"
            )
        reason = "dataset retired by the site's operator; no record follows"
        entries.append(ledger.append(LedgerRecord.about_the_ledger(RecordKind.RETIREMENT, entries[-1].record, reason)))
    private_dir(archive)
    for name in ARCHIVED_FILES:
        if (state_dir / name).exists():
            shutil.copy2(state_dir / name, archive / name)
            with (archive / name).open("rb") as stream:
                os.fsync(stream.fileno())
    (state_dir / PRIVATE_KEY_FILE).unlink()
    first = ROOT_PUBLIC_KEY_FILE if (archive / ROOT_PUBLIC_KEY_FILE).exists() else PUBLIC_KEY_FILE
    return Retirement(len(entries), archive, archive / first)
