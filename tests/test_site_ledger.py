"""A site's ledger cannot be quietly reset: it is verified whole, against the site's key
and its head, before every round, and its key is made by the site's own command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.terminal import labelled
from common.privacy.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    LedgerBroken,
    LedgerRecord,
    RecordKind,
    SiteLedger,
)

BIN = Path(sys.executable).parent


def _record(round_: int) -> LedgerRecord:
    return LedgerRecord(
        kind=RecordKind.REFUSAL, run_id=1, round=round_, site="site", mechanism="", noise_multiplier=0.0,
        sample_rate=0.0, sampling="poisson", steps=0, clip_norm=1.0, delta=1e-5, epsilon=0.0, accountant="rdp",
        budget_epsilon=8.0, dataset_hash="d", model_hash="", config_hash="", reason="test",
    )  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    ledger = SiteLedger(tmp_path / "site", create_key=True)
    for round_ in (1, 2, 3):
        ledger.append(_record(round_))
    return ledger


def _refusal_line(ledger: SiteLedger) -> str:
    with pytest.raises(LedgerBroken) as broken:
        SiteLedger(ledger.state_dir, create_key=False).verified_entries()
    line = str(broken.value)
    assert "\n" not in line and "refuses to train until its operator" in line
    return line


def test_an_intact_ledger_verifies(ledger: SiteLedger) -> None:
    assert [e.record.round for e in ledger.verified_entries()] == [1, 2, 3]


def test_a_truncated_ledger_is_refused(ledger: SiteLedger) -> None:
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:-1]))
    assert "records were removed from its end" in _refusal_line(ledger)


def test_a_deleted_ledger_is_refused(ledger: SiteLedger) -> None:
    ledger.path.unlink()
    assert "is missing while its head says it holds 3 record(s)" in _refusal_line(ledger)


def test_a_ledger_deleted_with_its_head_is_refused(ledger: SiteLedger) -> None:
    ledger.path.unlink()
    ledger.head_path.unlink()
    assert "no head file" in _refusal_line(ledger)


def test_a_ledger_re_signed_with_another_key_is_refused(ledger: SiteLedger, tmp_path: Path) -> None:
    forger = SiteLedger(tmp_path / "forger", create_key=True)
    for entry in ledger.entries():
        forger.append(entry.record)
    shutil.copy(forger.path, ledger.path)
    shutil.copy(forger.head_path, ledger.head_path)
    assert "signature that does not match this key" in _refusal_line(ledger)


def test_a_ledger_one_record_ahead_of_its_head_after_a_crash_verifies(ledger: SiteLedger) -> None:
    head = ledger.head_path.read_text()
    ledger.append(_record(4))
    ledger.head_path.write_text(head)  # the crash: the record reached the disk, the new head did not
    assert len(SiteLedger(ledger.state_dir, create_key=False).verified_entries()) == 4


def test_a_deployed_clientapp_never_makes_the_key(tmp_path: Path) -> None:
    with pytest.raises(LedgerBroken, match="cohort site init"):
        SiteLedger(tmp_path / "new-site", create_key=False)
    assert not (tmp_path / "new-site" / PRIVATE_KEY_FILE).exists()


def test_cohort_site_init_makes_the_key_and_an_empty_head_and_prints_the_fingerprint(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "cohort"), "site", "init", "--state-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    ledger = SiteLedger(tmp_path / "site", create_key=False)
    assert labelled("fingerprint", ledger.fingerprint()) in result.stdout
    assert (tmp_path / "site" / HEAD_FILE).exists() and not (tmp_path / "site" / LEDGER_FILE).exists()
    assert ledger.verified_entries() == []


def test_site_init_adopts_a_ledger_kept_before_heads_existed_once_its_chain_verifies(ledger: SiteLedger) -> None:
    ledger.head_path.unlink()
    assert ledger.adopt() == 3
    assert len(SiteLedger(ledger.state_dir, create_key=False).verified_entries()) == 3
