"""A site restored from an older backup releases nothing until it has its lost records
back: the coordinator sends, with every instruction, the newest entry it accepted from the
site; an entry signed by the site's key that its ledger lacks makes the site refuse, with
one line naming `cohort site import`, which takes the lost entries back from the
coordinator's run copies. A coordinator can withhold that entry, never forge one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common import protocol
from common.config import TrainingConfig
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FILE,
    LedgerEntry,
    LedgerRecord,
    RecordKind,
    SiteLedger,
    history_of,
    sign_entry,
    sign_head,
    write_head,
)
from deploy.launch import init_site_state
from simulations.in_process import InProcessGrid, run_in_process
from tests.conftest import flower_task_identity

COHORT = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[1]


def _instruction(server_round: int, newest: LedgerEntry | None) -> Message:
    config = {protocol.CONFIG_ROUND: server_round}
    if newest is not None:
        config[protocol.SITE_NEWEST_ENTRY] = newest.to_json()
    arrays = ArrayRecord(build_model(TrainingConfig().model, (1, 8, 8), 3).state_dict())
    return Message(
        content=RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord(config)}),
        dst_node_id=1,
        message_type="train",
    )


def _train(data: Path, state: Path, server_round: int, newest: LedgerEntry | None) -> Message:
    """The site's own ClientApp answering one round of run 7."""
    from client.app import app

    node_config = {"data-path": str(data), "state-dir": str(state), "epsilon": 8.0, "delta": 1e-5, "site-name": "a"}
    run_config = {"rounds": 3, "batch-size": 20, "noise-multiplier": 4.0}
    context = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    return app(_instruction(server_round, newest), context)


def _entry(reply: Message) -> LedgerEntry:
    assert not reply.has_error(), reply.error.reason
    return LedgerEntry.from_json(str(reply.content[protocol.SITE][protocol.SITE_LEDGER_ENTRY]))


@pytest.fixture
def restored(site_npz: Path, tmp_path: Path, clientapp_identity: None) -> tuple[Path, list[LedgerEntry]]:
    """A site that released in rounds 1 and 2, then had its state directory restored from
    the backup taken after round 1; and the coordinator's run copy holding both entries
    (beside another site's)."""
    state, backup = tmp_path / "state", tmp_path / "backup"
    init_site_state(state)
    first = _entry(_train(site_npz, state, 1, None))
    shutil.copytree(state, backup)
    second = _entry(_train(site_npz, state, 2, first))
    shutil.rmtree(state)
    shutil.copytree(backup, state)
    other = SiteLedger(tmp_path / "other-site").append(SiteLedger(state).entries()[0].record)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LEDGER_FILE).write_text("".join(e.to_json() + "\n" for e in (first, other, second)))
    return state, [first, second]


def test_a_site_restored_from_an_older_backup_refuses_naming_the_import(
    site_npz: Path, restored: tuple[Path, list[LedgerEntry]]
) -> None:
    state, (_, second) = restored
    reply = _train(site_npz, state, 3, second)
    assert reply.has_error() and reply.error.code == protocol.SITE_REFUSED
    assert reply.error.reason == (
        "site a refuses to train: its ledger holds 1 record(s) but the coordinator holds its signed record 2 "
        "(run 7, round 2): it was restored from an older backup or cut short; its operator must import the missing "
        "records (cohort site import)"
    )
    assert len(SiteLedger(state).verified_entries()) == 1, "a refusal on a rolled-back ledger would fork it"


def test_the_sites_log_line_names_the_import_command(
    site_npz: Path, restored: tuple[Path, list[LedgerEntry]], capsys: pytest.CaptureFixture[str]
) -> None:
    state, (_, second) = restored
    _train(site_npz, state, 3, second)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line.endswith(f"`cohort site import --state-dir {state.resolve()} RUN_DIR...`")


def test_an_entry_no_key_of_the_site_signed_gains_a_coordinator_only_a_refusal(
    site_npz: Path, restored: tuple[Path, list[LedgerEntry]]
) -> None:
    state, (first, _second) = restored
    forger = SiteLedger(state.parent / "forger")
    forged = sign_entry(forger._key, 0, first.previous_hash, first.record)
    reply = _train(site_npz, state, 3, forged)
    assert reply.has_error() and "is not signed by any key its ledger holds" in reply.error.reason
    assert len(SiteLedger(state).verified_entries()) == 1


def test_a_coordinator_that_withholds_the_entry_leaves_the_site_as_its_own_ledger_says(
    site_npz: Path, restored: tuple[Path, list[LedgerEntry]]
) -> None:
    state, (first, _) = restored
    assert not _train(site_npz, state, 3, None).has_error()
    assert not _train(site_npz, state, 3, first).has_error()


def test_import_takes_back_the_lost_entries_and_the_site_trains_again(
    site_npz: Path, restored: tuple[Path, list[LedgerEntry]]
) -> None:
    state, (first, second) = restored
    result = subprocess.run(
        [*COHORT, "site", "import", "--state-dir", str(state), str(state.parent / "run")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 1 record(s); the ledger holds 2"
    assert [e.entry_hash() for e in SiteLedger(state).verified_entries()] == [first.entry_hash(), second.entry_hash()]
    third = _entry(_train(site_npz, state, 3, second))
    assert third.sequence == 2 and third.previous_hash == second.entry_hash()


def test_an_import_that_cannot_link_says_which_record_is_missing(
    site_npz: Path, restored: tuple[Path, list[LedgerEntry]], tmp_path: Path
) -> None:
    state, (_first, second) = restored
    ledger = SiteLedger(state)
    ledger.path.unlink()
    write_head(ledger.head_path, sign_head(ledger._key, 0, GENESIS_HASH))  # emptied by someone holding the key
    copy = tmp_path / "only-second.jsonl"
    copy.write_text(second.to_json() + "\n")
    result = subprocess.run(
        [*COHORT, "site", "import", "--state-dir", str(state), str(copy)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "the copies hold this site's record(s) 2 but not record 1" in result.stderr


@dataclass(frozen=True)
class RestoredFederation:
    """Studies on one federation home: A, then site-0's state directory backed up, B, the
    backup restored, C; then `cohort site import` from B's run directory, and D."""

    home: Path
    after_restore: InProcessGrid
    imported: subprocess.CompletedProcess[str]
    after_import: InProcessGrid


@pytest.fixture(scope="module")
def restored_federation(tmp_path_factory: pytest.TempPathFactory) -> RestoredFederation:
    """The coordinator's ServerApp and the sites' own ClientApp in this process: the
    coordinator's site book (federation-home/site-book.json) carries site-0's newest entry
    from run to run, and the study's ask tells it which node is site-0 before round 1."""
    root = tmp_path_factory.mktemp("restored")
    home = root / "federation"

    def study(name: str, run_id: int) -> InProcessGrid:
        settings = {"rounds": 1, "study-epsilon": 2.0, "federation-home": str(home), "noise-source": "seeded"}
        return run_in_process(settings, 3, root / name, run_id=run_id)

    with flower_task_identity():
        study("a", 1)
        shutil.copytree(home / "site-0", root / "backup")
        study("b", 2)
        shutil.rmtree(home / "site-0")
        shutil.copytree(root / "backup", home / "site-0")
        after_restore = study("c", 3)
        imported = subprocess.run(
            [*COHORT, "site", "import", "--state-dir", str(home / "site-0"), str(root / "b")],
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        )  # fmt: skip
        after_import = study("d", 4)
    return RestoredFederation(home, after_restore, imported, after_import)


def _site_releases(home: Path, site: str) -> list[LedgerRecord]:
    return [e.record for e in SiteLedger(home / site).verified_entries() if e.record.kind == RecordKind.RELEASE]


def test_a_simulated_site_restored_from_backup_refuses_round_1_of_the_next_study(
    restored_federation: RestoredFederation,
) -> None:
    refused = [reply.error.reason for reply in restored_federation.after_restore.received if reply.has_error()]
    assert len(refused) == 1 and refused[0].startswith("site site-0 refuses to train: its ledger holds"), refused
    assert "cohort site import" in refused[0]
    assert [r.run_id for r in _site_releases(restored_federation.home, "site-1")][-2:] == [3, 4]


def test_after_the_import_the_site_trains_and_its_releases_compose_within_its_budget(
    restored_federation: RestoredFederation,
) -> None:
    assert restored_federation.imported.returncode == 0, restored_federation.imported.stderr
    releases = _site_releases(restored_federation.home, "site-0")
    assert [r.run_id for r in releases] == [1, 2, 4]
    composed = PrivacyState(1.0, 1.0, "rdp", history_of(releases)).epsilon(releases[-1].delta)
    assert composed == pytest.approx(releases[-1].epsilon, rel=1e-9) and composed <= releases[-1].budget_epsilon
