"""`cohort audit verify` catches every way a site's state directory can be made to forget
what it spent: it checks the pinned key, the chain, the signed head and the coordinator's
copies of the site's entries."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.ledger_verification import LedgerFailed, verify_site_ledger
from common.privacy.ledger import (
    GENESIS_HASH,
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    LedgerEntry,
    SiteLedger,
    load_public_key,
)
from tests.conftest import cohort, ledger_release


@pytest.fixture
def site(site_state: Path, tmp_path: Path) -> tuple[Path, Ed25519PublicKey, Path]:
    """A site's state directory after rounds 1 and 2 (backed up) and 3, and the
    coordinator's run copy of all three entries."""
    shutil.copytree(site_state, tmp_path / "backup")
    SiteLedger(site_state).append(ledger_release(3))
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / LEDGER_FILE).write_text("".join(e.to_json() + "\n" for e in SiteLedger(site_state).entries()))
    return site_state, load_public_key(site_state / PUBLIC_KEY_FILE), copy


def _truncate(state: Path) -> None:
    lines = (state / LEDGER_FILE).read_text().splitlines(keepends=True)
    (state / LEDGER_FILE).write_text("".join(lines[:-1]))


def _truncate_and_rewrite_head(state: Path) -> None:
    _truncate(state)
    last = LedgerEntry.from_json((state / LEDGER_FILE).read_text().splitlines()[-1])
    (state / HEAD_FILE).write_text(json.dumps({"count": 2, "last_hash": last.entry_hash()}))


def _empty_with_zero_head(state: Path) -> None:
    (state / LEDGER_FILE).write_text("")
    (state / HEAD_FILE).write_text(json.dumps({"count": 0, "last_hash": GENESIS_HASH}))


def _restore_older_backup(state: Path) -> None:
    shutil.rmtree(state)
    shutil.copytree(state.parent / "backup", state)


def _resign_with_a_new_key(state: Path) -> None:
    entries = SiteLedger(state).entries()
    for name in (LEDGER_FILE, HEAD_FILE, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE):
        (state / name).unlink()
    forged = SiteLedger(state)
    for entry in entries[:1]:
        forged.append(entry.record)


@pytest.mark.parametrize(
    "tamper,caught",
    [
        (_truncate, "holds 2 record(s) but its head says 3"),
        (_truncate_and_rewrite_head, "has an unsigned head"),
        (_empty_with_zero_head, "has an unsigned head"),
        (_restore_older_backup, "lacks record 3 (run 1, round 3) that the site signed"),
        (_resign_with_a_new_key, "not the pinned"),
    ],
    ids=["truncated", "truncated, head rewritten", "emptied, zero head", "older backup", "re-signed, new key"],
)
def test_every_way_to_forget_spending_fails_verification(
    site: tuple[Path, Ed25519PublicKey, Path], tamper: Callable[[Path], None], caught: str
) -> None:
    state, _, copy = site
    tamper(state)
    presented = load_public_key(state / PUBLIC_KEY_FILE)  # what the site sends: its current public key
    with pytest.raises(LedgerFailed, match=caught.replace("(", r"\(").replace(")", r"\)")):
        verify_site_ledger(state, presented, None, [copy])


def test_a_key_other_than_the_auditors_recorded_fingerprint_fails(site: tuple[Path, Ed25519PublicKey, Path]) -> None:
    state, key, copy = site
    with pytest.raises(LedgerFailed, match="not the pinned SHA256:0000"):
        verify_site_ledger(state, key, "SHA256:" + "0" * 64, [copy])


def test_an_intact_ledger_verifies_with_its_pin_and_the_coordinators_copies(
    site: tuple[Path, Ed25519PublicKey, Path],
) -> None:
    state, key, copy = site
    verified = verify_site_ledger(state, key, None, [copy])
    assert (verified.records, verified.compared) == (3, 3) and verified.pinned_by.startswith("ledger-key in")


def test_cohort_audit_verify_exits_1_on_a_restored_backup_and_0_once_it_is_whole(
    site: tuple[Path, Ed25519PublicKey, Path],
) -> None:
    state, _key, copy = site
    whole = state.parent / "whole"
    shutil.copytree(state, whole)
    _restore_older_backup(state)

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        return cohort("audit", "verify", str(path), "--public-key", str(path / PUBLIC_KEY_FILE), "--run-dir", str(copy))

    restored = verify(state)
    assert restored.returncode == 1 and "lacks record 3 (run 1, round 3)" in " ".join(restored.stderr.split())
    assert verify(whole).returncode == 0
