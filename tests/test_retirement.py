"""A retired dataset's ledger ends with a signed retirement, is archived where an auditor
verifies it like a live one, and the site signs nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.retirement import retire
from common.errors import CohortInputError
from common.privacy.ledger import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, LedgerBroken, LedgerRecord, RecordKind, SiteLedger
from deploy.launch import init_site_state
from tests.conftest import cohort, ledger_release


def test_a_retired_datasets_archive_verifies_like_a_live_ledger(site_state: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    retired = cohort("site", "retire", "--state-dir", str(site_state), "--archive", str(archive))
    assert retired.returncode == 0, retired.stderr
    verified = cohort("audit", "verify", str(archive), "--public-key", str(archive / PUBLIC_KEY_FILE))
    assert verified.returncode == 0, verified.stderr
    assert "the dataset was retired at record 3: no record follows" in verified.stdout
    assert "ledger-key in" in " ".join(verified.stdout.split())


def test_a_retired_site_has_no_key_to_sign_with_and_makes_no_new_one(site_state: Path, tmp_path: Path) -> None:
    retire(site_state, tmp_path / "archive")
    assert not (site_state / PRIVATE_KEY_FILE).exists()
    with pytest.raises(CohortInputError, match="no new key is made while the old one is pinned"):
        init_site_state(site_state)


def test_a_ledger_ending_with_its_retirement_trains_no_more(site_state: Path) -> None:
    ledger = SiteLedger(site_state)
    ledger.append(LedgerRecord.about_the_ledger(RecordKind.RETIREMENT, ledger_release(2), "retired"))
    with pytest.raises(LedgerBroken, match="a retired dataset trains no more"):
        ledger.verified_entries()


def test_retiring_again_after_a_crash_finishes_the_archive(site_state: Path, tmp_path: Path) -> None:
    ledger = SiteLedger(site_state)
    ledger.append(LedgerRecord.about_the_ledger(RecordKind.RETIREMENT, ledger_release(2), "retired"))  # then the crash
    assert retire(site_state, tmp_path / "archive").records == 3
    assert not (site_state / PRIVATE_KEY_FILE).exists()
