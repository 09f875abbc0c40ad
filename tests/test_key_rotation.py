"""A site's ledger key is rotated with continuity: the last entry under the old key names
the new one, the pin stays the first key's, and `cohort audit verify` follows the chain
from the pinned key through every rotation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from client.key_rotation import rotate_key
from common.privacy.ledger import (
    NEXT_KEY_FILE,
    PRIVATE_KEY_FILE,
    ROOT_PUBLIC_KEY_FILE,
    LedgerBroken,
    RecordKind,
    SiteLedger,
    key_fingerprint,
)
from deploy.launch import init_site_state
from tests.conftest import cohort, ledger_release


def test_audit_verify_follows_the_chain_from_the_pinned_first_key_through_a_rotation(site_state: Path) -> None:
    first = SiteLedger(site_state).fingerprint()
    rotated = cohort("site", "rotate-key", "--state-dir", str(site_state))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("rotated at record 3")
    SiteLedger(site_state).append(ledger_release(3))
    verified = cohort("audit", "verify", str(site_state), "--public-key", str(site_state / ROOT_PUBLIC_KEY_FILE))
    assert verified.returncode == 0, verified.stderr
    assert "the key was rotated 1 time(s)" in verified.stdout and first in verified.stdout


def test_after_a_rotation_the_site_signs_with_the_new_key_under_the_same_pin(site_state: Path) -> None:
    pin = SiteLedger(site_state).fingerprint()
    rotation = rotate_key(site_state)
    ledger = SiteLedger(site_state, create_key=False, pinned_key=pin)
    entry = ledger.append(ledger_release(3))
    assert key_fingerprint(ledger.public_key) == rotation.new != rotation.old
    assert [e.record.kind for e in ledger.verified_entries()][-2:] == [RecordKind.KEY_ROTATION, RecordKind.RELEASE]
    assert entry.sequence == 3 and ledger.fingerprint() == pin


def test_the_old_key_signs_nothing_the_chain_accepts_after_the_rotation(site_state: Path, tmp_path: Path) -> None:
    stolen = tmp_path / "stolen"
    shutil.copytree(site_state, stolen)
    rotate_key(site_state)
    old = SiteLedger(stolen)
    shutil.copy(site_state / "privacy_ledger.jsonl", stolen / "privacy_ledger.jsonl")
    old.append(ledger_release(3))  # whoever kept a copy of the old key, after the rotation
    shutil.copy(stolen / "privacy_ledger.jsonl", site_state / "privacy_ledger.jsonl")
    with pytest.raises(LedgerBroken, match=r"record 4 .* signature that does not match this key"):
        SiteLedger(site_state).verified_entries()


def test_a_rotation_interrupted_before_the_key_was_replaced_is_finished_by_running_it_again(
    site_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as crash:
        crash.setattr(SiteLedger, "finish_rotation", lambda self: False)  # the process dies after the entry
        SiteLedger(site_state).rotate(ledger_release(0))
    assert (site_state / NEXT_KEY_FILE).exists()
    with pytest.raises(LedgerBroken, match="a key rotation that did not finish"):
        SiteLedger(site_state).verified_entries()
    assert rotate_key(site_state).resumed
    assert len(SiteLedger(site_state).verified_entries()) == 3 and not (site_state / NEXT_KEY_FILE).exists()


def test_an_empty_ledger_has_nothing_to_rotate(tmp_path: Path) -> None:
    init_site_state(tmp_path / "state")
    rotated = cohort("site", "rotate-key", "--state-dir", str(tmp_path / "state"))
    assert rotated.returncode == 2 and "nothing was signed with its key yet" in rotated.stderr
    assert (tmp_path / "state" / PRIVATE_KEY_FILE).exists()
