"""The site ledger: append-only, hash-chained, signed; any edit is caught by verify."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from common.errors import CohortInputError
from common.privacy.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    LedgerRecord,
    RecordKind,
    SiteLedger,
    load_public_key,
    read_entries,
    verify_chain,
)
from common.privacy.mechanisms import Mechanism


def _record(round_: int, epsilon: float) -> LedgerRecord:
    return LedgerRecord(
        kind=RecordKind.RELEASE,
        run_id=7,
        round=round_,
        site="site-0",
        mechanism=Mechanism.SAMPLE_LEVEL_DP_SGD,
        noise_multiplier=1.1,
        sample_rate=0.2,
        sampling="poisson",
        steps=5,
        clip_norm=1.0,
        delta=1e-5,
        epsilon=epsilon,
        accountant="rdp",
        budget_epsilon=8.0,
        dataset_hash="d" * 64,
        model_hash="m" * 64,
        config_hash="c" * 64,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    site = SiteLedger(tmp_path / "site-0")
    for round_ in range(1, 5):
        site.append(_record(round_, 0.5 * round_))
    return site


def _verify(ledger: SiteLedger, key_dir: Path | None = None) -> str | None:
    key = load_public_key((key_dir or ledger.state_dir) / PUBLIC_KEY_FILE)
    return verify_chain(read_entries(ledger.path), key)


def test_an_untouched_ledger_verifies(ledger: SiteLedger) -> None:
    assert _verify(ledger) is None


def test_the_signing_key_is_private_to_its_owner(ledger: SiteLedger) -> None:
    assert stat.S_IMODE((ledger.state_dir / PRIVATE_KEY_FILE).stat().st_mode) == 0o600


def test_a_new_state_directory_and_its_ledger_are_private_to_their_owner_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        ledger = SiteLedger(tmp_path / "sites" / "a")
        ledger.append(_record(1, 0.5))
    finally:
        os.umask(previous)
    modes = {
        path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "sites", *(tmp_path / "sites").rglob("*"))
    }
    assert modes == {
        "sites": 0o700,
        "a": 0o700,
        PRIVATE_KEY_FILE: 0o600,
        PUBLIC_KEY_FILE: 0o644,
        LEDGER_FILE: 0o600,
        HEAD_FILE: 0o600,
    }


def test_the_key_is_reused_so_a_ledger_spans_runs(ledger: SiteLedger) -> None:
    again = SiteLedger(ledger.state_dir)
    again.append(_record(5, 2.6))
    assert len(again.entries()) == 5 and _verify(again) is None


def _rewrite(ledger: SiteLedger, lines: list[str]) -> None:
    ledger.path.write_text("".join(line + "\n" for line in lines))


def test_editing_a_byte_of_a_record_is_caught(ledger: SiteLedger) -> None:
    lines = ledger.path.read_text().splitlines()
    lines[1] = lines[1].replace('"epsilon": 1.0', '"epsilon": 0.1')
    _rewrite(ledger, lines)
    assert "record 2" in _verify(ledger)


def test_deleting_a_record_is_caught(ledger: SiteLedger) -> None:
    lines = ledger.path.read_text().splitlines()
    _rewrite(ledger, lines[:1] + lines[2:])
    assert "record 2" in _verify(ledger)


def test_swapping_two_records_is_caught(ledger: SiteLedger) -> None:
    lines = ledger.path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(ledger, lines)
    assert "record 2" in _verify(ledger)


def test_a_record_re_signed_with_another_key_is_caught(ledger: SiteLedger, tmp_path: Path) -> None:
    impostor = SiteLedger(tmp_path / "impostor")
    for entry in ledger.entries():
        impostor.append(entry.record)
    assert _verify(impostor, key_dir=ledger.state_dir) == (
        "record 1 (round 1, run 7) has a signature that does not match this key: it was edited or signed by another key"
    )


def test_a_truncated_ledger_is_refused_clearly(ledger: SiteLedger) -> None:
    ledger.path.write_text(ledger.path.read_text()[:-40])
    with pytest.raises(CohortInputError, match="record 4 is not a ledger record"):
        read_entries(ledger.path)


def test_a_key_file_that_is_no_key_is_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text("hello")
    with pytest.raises(CohortInputError, match="is not a PEM public key"):
        load_public_key(bad)


def test_a_loosely_permitted_signing_key_is_refused(ledger: SiteLedger) -> None:
    (ledger.state_dir / PRIVATE_KEY_FILE).chmod(0o644)
    with pytest.raises(CohortInputError, match="chmod 600"):
        SiteLedger(ledger.state_dir)


def test_records_are_json_lines_with_the_documented_fields(ledger: SiteLedger) -> None:
    first = json.loads(ledger.path.read_text().splitlines()[0])
    assert set(first) == {"sequence", "previous_hash", "record", "signature"}
    assert {
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "delta",
        "epsilon",
        "dataset_hash",
        "model_hash",
    } <= set(first["record"])
