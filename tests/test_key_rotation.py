"""A site's ledger key is rotated with continuity: the last entry under the old key names
the new one, the pin stays the first key's, and `cohort audit verify` follows the chain
from the pinned key through every rotation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.key_rotation import rotate_key
from common.privacy.ledger import (
    NEXT_KEY_FILE,
    PRIVATE_KEY_FILE,
    ROOT_PUBLIC_KEY_FILE,
    LedgerBroken,
    LedgerRecord,
    RecordKind,
    SiteLedger,
    key_fingerprint,
)
from deploy.launch import init_site_state

ROOT = Path(__file__).resolve().parents[1]


def _record(round_: int) -> LedgerRecord:
    return LedgerRecord(
        kind=RecordKind.RELEASE, run_id=1, round=round_, site="site", mechanism="", noise_multiplier=1.0, sample_rate=0.1, sampling="poisson",
        steps=10, clip_norm=1.0, delta=1e-5, epsilon=0.5, accountant="rdp", budget_epsilon=8.0, dataset_hash="d", model_hash="",
        config_hash="",
    )  # fmt: skip


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    init_site_state(state)
    ledger = SiteLedger(state)
    ledger.append(_record(1))
    ledger.append(_record(2))
    return state


def _cohort(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_audit_verify_follows_the_chain_from_the_pinned_first_key_through_a_rotation(state: Path) -> None:
    first = SiteLedger(state).fingerprint()
    rotated = _cohort("site", "rotate-key", "--state-dir", str(state))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("rotated at record 3")
    SiteLedger(state).append(_record(3))
    verified = _cohort("audit", "verify", str(state), "--public-key", str(state / ROOT_PUBLIC_KEY_FILE))
    assert verified.returncode == 0, verified.stderr
    assert "the key was rotated 1 time(s)" in verified.stdout and first in verified.stdout


def test_after_a_rotation_the_site_signs_with_the_new_key_under_the_same_pin(state: Path) -> None:
    pin = SiteLedger(state).fingerprint()
    rotation = rotate_key(state)
    ledger = SiteLedger(state, create_key=False, pinned_key=pin)
    entry = ledger.append(_record(3))
    assert key_fingerprint(ledger.public_key) == rotation.new != rotation.old
    assert [e.record.kind for e in ledger.verified_entries()][-2:] == [RecordKind.KEY_ROTATION, RecordKind.RELEASE]
    assert entry.sequence == 3 and ledger.fingerprint() == pin


def test_the_old_key_signs_nothing_the_chain_accepts_after_the_rotation(state: Path, tmp_path: Path) -> None:
    stolen = tmp_path / "stolen"
    shutil.copytree(state, stolen)
    rotate_key(state)
    old = SiteLedger(stolen)
    shutil.copy(state / "privacy_ledger.jsonl", stolen / "privacy_ledger.jsonl")
    old.append(_record(3))  # whoever kept a copy of the old key, after the rotation
    shutil.copy(stolen / "privacy_ledger.jsonl", state / "privacy_ledger.jsonl")
    with pytest.raises(LedgerBroken, match="record 4 .* signature that does not match this key"):
        SiteLedger(state).verified_entries()


def test_a_rotation_interrupted_before_the_key_was_replaced_is_finished_by_running_it_again(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as crash:
        crash.setattr(SiteLedger, "finish_rotation", lambda self: False)  # the process dies after the entry
        SiteLedger(state).rotate(_record(0))
    assert (state / NEXT_KEY_FILE).exists()
    with pytest.raises(LedgerBroken, match="a key rotation that did not finish"):
        SiteLedger(state).verified_entries()
    assert rotate_key(state).resumed
    assert len(SiteLedger(state).verified_entries()) == 3 and not (state / NEXT_KEY_FILE).exists()


def test_an_empty_ledger_has_nothing_to_rotate(tmp_path: Path) -> None:
    init_site_state(tmp_path / "state")
    rotated = _cohort("site", "rotate-key", "--state-dir", str(tmp_path / "state"))
    assert rotated.returncode == 2 and "nothing was signed with its key yet" in rotated.stderr
    assert (tmp_path / "state" / PRIVATE_KEY_FILE).exists()
