"""A site's ledger cannot be quietly reset: it is verified whole, against the site's key
and its head, before every round, and its key is made by the site's own command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.terminal import labelled
from client.ledger_guard import open_site_ledger
from client.policy import POLICY_FILE, SiteConfig, pinned_ledger_key
from common.config import SiteRunConfig
from common.errors import CohortInputError
from common.privacy.ledger import (
    GENESIS_HASH,
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    LedgerBroken,
    LedgerRecord,
    RecordKind,
    SiteLedger,
    sign_head,
    write_head,
)
from deploy.launch import init_site_state

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


def test_a_head_rewritten_without_the_key_is_refused(ledger: SiteLedger) -> None:
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:-1]))
    last = ledger.entries()[-1]
    ledger.head_path.write_text(json.dumps({"count": 2, "last_hash": last.entry_hash()}))
    assert "unsigned head privacy_ledger.head.json: it was rewritten without the key" in _refusal_line(ledger)


def test_an_emptied_ledger_under_a_zero_head_is_refused(ledger: SiteLedger) -> None:
    ledger.path.write_text("")
    ledger.head_path.write_text(json.dumps({"count": 0, "last_hash": GENESIS_HASH}))
    assert "unsigned head privacy_ledger.head.json: it was rewritten without the key" in _refusal_line(ledger)


def test_a_state_directory_holding_another_key_than_its_pin_is_refused(tmp_path: Path) -> None:
    pinned = init_site_state(tmp_path / "site")
    for name in (PRIVATE_KEY_FILE, HEAD_FILE):
        (tmp_path / "site" / name).unlink()
    swapped = SiteLedger(tmp_path / "site", create_key=True, pinned_key=pinned)
    with pytest.raises(LedgerBroken, match=f"not the key {pinned} its policy pins"):
        swapped.verified_entries()


def test_site_init_refuses_to_make_a_new_key_while_the_old_one_is_pinned(tmp_path: Path) -> None:
    init_site_state(tmp_path / "site")
    (tmp_path / "site" / PRIVATE_KEY_FILE).unlink()
    with pytest.raises(CohortInputError, match="no new key is made while the old one is pinned"):
        init_site_state(tmp_path / "site")


def test_site_init_pins_the_key_in_the_sites_policy(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / POLICY_FILE).write_text("epsilon = 4.0\n")
    fingerprint = init_site_state(tmp_path / "site")
    assert pinned_ledger_key(tmp_path / "site") == fingerprint
    assert "epsilon = 4.0" in (tmp_path / "site" / POLICY_FILE).read_text()


def test_site_init_signs_a_head_written_before_heads_were_signed(ledger: SiteLedger) -> None:
    head = json.loads(ledger.head_path.read_text())
    ledger.head_path.write_text(json.dumps({"count": head["count"], "last_hash": head["last_hash"]}))
    assert ledger.adopt() == 3
    assert len(ledger.verified_entries()) == 3


def test_a_head_signed_by_another_key_is_refused(ledger: SiteLedger, tmp_path: Path) -> None:
    other = SiteLedger(tmp_path / "other", create_key=True)
    write_head(ledger.head_path, sign_head(other._key, 3, ledger.entries()[-1].entry_hash()))
    assert "not signed by this key: it was rewritten" in _refusal_line(ledger)


def test_a_simulated_site_pins_its_key_on_first_use_and_refuses_another_after(tmp_path: Path) -> None:
    run = SiteRunConfig.from_flower({"federation-home": str(tmp_path)})
    site = SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 3}, run)
    pin = open_site_ledger(site).fingerprint()
    assert pinned_ledger_key(site.state_dir) == pin
    (site.state_dir / PRIVATE_KEY_FILE).unlink()
    with pytest.raises(LedgerBroken, match=f"not the key {pin} its policy pins"):
        open_site_ledger(SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 3}, run)).verified_entries()


def test_a_deployed_site_without_a_pin_refuses_naming_site_init(tmp_path: Path) -> None:
    SiteLedger(tmp_path / "state")
    node_config = {"data-path": "/data", "state-dir": str(tmp_path / "state"), "epsilon": 2.0, "delta": 1e-5}
    with pytest.raises(LedgerBroken, match=r"pins no ledger key.*cohort site init"):
        open_site_ledger(SiteConfig.from_node_config(node_config, SiteRunConfig()))
