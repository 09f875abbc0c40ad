"""A retired dataset's ledger ends with a signed retirement, is archived where an auditor
verifies it like a live one, and the site signs nothing more."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.retirement import retire
from common.errors import CohortInputError
from common.privacy.ledger import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, LedgerBroken, LedgerRecord, RecordKind, SiteLedger
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


def test_a_retired_datasets_archive_verifies_like_a_live_ledger(state: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    retired = _cohort("site", "retire", "--state-dir", str(state), "--archive", str(archive))
    assert retired.returncode == 0, retired.stderr
    verified = _cohort("audit", "verify", str(archive), "--public-key", str(archive / PUBLIC_KEY_FILE))
    assert verified.returncode == 0, verified.stderr
    assert "the dataset was retired at record 3: no record follows" in verified.stdout
    assert "ledger-key in" in " ".join(verified.stdout.split())


def test_a_retired_site_has_no_key_to_sign_with_and_makes_no_new_one(state: Path, tmp_path: Path) -> None:
    retire(state, tmp_path / "archive")
    assert not (state / PRIVATE_KEY_FILE).exists()
    with pytest.raises(CohortInputError, match="no new key is made while the old one is pinned"):
        init_site_state(state)


def test_a_ledger_ending_with_its_retirement_trains_no_more(state: Path) -> None:
    ledger = SiteLedger(state)
    ledger.append(LedgerRecord.about_the_ledger(RecordKind.RETIREMENT, _record(2), "retired"))
    with pytest.raises(LedgerBroken, match="a retired dataset trains no more"):
        ledger.verified_entries()


def test_retiring_again_after_a_crash_finishes_the_archive(state: Path, tmp_path: Path) -> None:
    ledger = SiteLedger(state)
    ledger.append(LedgerRecord.about_the_ledger(RecordKind.RETIREMENT, _record(2), "retired"))  # then the crash
    assert retire(state, tmp_path / "archive").records == 3
    assert not (state / PRIVATE_KEY_FILE).exists()
