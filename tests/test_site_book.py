"""The coordinator's site book holds every site to its registered name and its ledger key
across runs, and every instruction carries the newest entry accepted from its site: on
real Flower Messages, real signed entries from real site ledgers, and the book's file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from common import protocol
from common.errors import CohortInputError
from common.privacy.ledger import LEDGER_FILE, LedgerEntry
from deploy.site_registration import site_book_path
from server.exchange import Exchange, ReplyTimeout
from server.records import RoundReport
from server.reply_checks import ReplyChecker, Update
from server.site_book import BookedSite, LedgerKey, SiteBook, now, write_key_history
from server.site_registry import SiteRegistry
from tests.test_reply_checks import RUN, RUN_ID, Site, check, instruction, rejected, serverapp_identity

__all__ = ["serverapp_identity"]  # the autouse fixture: Messages need the ServerApp's identity


@pytest.fixture
def book(tmp_path: Path) -> SiteBook:
    return SiteBook(tmp_path / "coordinator" / "site-book.json")


def run_of(book: SiteBook, run_id: int = RUN_ID) -> ReplyChecker:
    """A new run on the book: a registry that remembers nothing but what the book holds."""
    registry = SiteRegistry()
    registry.attach(book, run_id)
    return ReplyChecker(RUN, run_id, registry)


def register(book: SiteBook, name: str, node: int) -> None:
    """What `cohort site register` records once Flower returned the node id."""
    with book.editing() as sites:
        site = sites.setdefault(name, BookedSite())
        site.supernode_key, site.node_id = f"ecdsa-sha2-nistp384 key-of-{name}", node


def test_a_registered_node_claiming_another_sites_name_is_rejected_under_its_own_name(
    book: SiteBook, tmp_path: Path
) -> None:
    register(book, "hospital-b", 22)
    register(book, "impostor", 33)
    checker = run_of(book)
    rejection = rejected(
        checker, Site(tmp_path / "impostor", "hospital-b", node=33).reply(), "registered as impostor but claims"
    )
    assert rejection.site == "impostor"
    assert isinstance(check(checker, Site(tmp_path, "hospital-b", node=22).reply()), Update)


def test_the_impostor_is_rejected_even_while_the_real_site_is_offline(book: SiteBook, tmp_path: Path) -> None:
    register(book, "hospital-b", 22)
    register(book, "impostor", 33)
    rejected(run_of(book), Site(tmp_path, "hospital-b", node=33).reply(), "node 33 is registered as impostor")
    assert "hospital-b" not in book.read() or book.read()["hospital-b"].ledger_key is None


def test_a_node_registered_without_a_name_is_rejected_once_sites_are_registered(book: SiteBook, tmp_path: Path) -> None:
    register(book, "hospital-a", 11)
    rejection = rejected(run_of(book), Site(tmp_path, "hospital-c", node=44).reply(), "not registered by name")
    assert rejection.site == "node 44"


def test_a_sites_ledger_key_first_seen_binds_its_name_in_later_runs(book: SiteBook, tmp_path: Path) -> None:
    assert isinstance(check(run_of(book), Site(tmp_path, "site-0", node=11).reply()), Update)
    impostor = Site(tmp_path / "elsewhere", "site-0", node=12)
    rejected(run_of(book, RUN_ID + 1), impostor.reply(), "with a ledger key that is not site-0's")
    (key,) = book.read()["site-0"].ledger_keys
    assert key.how == f"first seen in run {RUN_ID}"


def test_the_newest_accepted_entry_is_kept_whole_across_runs(book: SiteBook, tmp_path: Path) -> None:
    site = Site(tmp_path, "site-0", node=11)
    update = check(run_of(book), site.reply())
    assert isinstance(update, Update)
    assert LedgerEntry.from_json(book.read()["site-0"].ledger_keys[-1].newest_entry) == update.entry
    rejected(run_of(book), _resent(site, update), "not after the 0 it already sent")


def test_a_ledger_key_the_coordinator_set_replaces_the_first_and_the_old_key_is_refused(
    book: SiteBook, tmp_path: Path
) -> None:
    old = Site(tmp_path / "old", "site-0", node=11)
    assert isinstance(check(run_of(book), old.reply()), Update)
    new = Site(tmp_path / "new", "site-0", node=11)
    with book.editing() as sites:
        sites["site-0"].ledger_keys.append(LedgerKey(new.key_pem, now(), "set by the coordinator"))
    assert isinstance(check(run_of(book), new.reply()), Update)
    rejected(run_of(book), Site(tmp_path / "old", "site-0", node=11).reply(), "not site-0's")
    assert [key.how for key in book.read()["site-0"].ledger_keys] == ["first seen in run 7", "set by the coordinator"]


class RecordingGrid:
    """Flower's Grid as the exchange uses it: what was sent, and the replies the sites give."""

    def __init__(self, answer: dict[int, Message] | None = None) -> None:
        self.sent: list[Message] = []
        self.answer = answer or {}

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        self.sent = list(messages)
        return [self.answer[m.metadata.dst_node_id] for m in messages if m.metadata.dst_node_id in self.answer]


def test_each_instruction_carries_the_newest_entry_of_its_own_site(book: SiteBook, tmp_path: Path) -> None:
    register(book, "hospital-a", 11)
    register(book, "hospital-b", 22)
    update = check(run_of(book), Site(tmp_path, "hospital-a", node=11).reply())
    assert isinstance(update, Update)
    grid = RecordingGrid()
    registry = SiteRegistry()
    registry.attach(book, 2)
    shared = RecordDict({protocol.CONFIG: ConfigRecord({protocol.CONFIG_ROUND: 1})})
    messages = [Message(content=shared, dst_node_id=node, message_type="train") for node in (11, 22)]
    Exchange(grid, ReplyTimeout(1.0), registry).send(messages, "train", RoundReport(1))  # type: ignore[arg-type]
    configs = {m.metadata.dst_node_id: m.content.config_records[protocol.CONFIG] for m in grid.sent}
    assert configs[11][protocol.SITE_NEWEST_ENTRY] == update.entry.to_json()
    assert protocol.SITE_NEWEST_ENTRY not in configs[22] and configs[22][protocol.CONFIG_ROUND] == 1


def test_a_refusal_naming_another_site_is_recorded_under_the_refusing_nodes_own_name(book: SiteBook) -> None:
    register(book, "site-a", 11)
    register(book, "intruder", 33)
    registry = SiteRegistry()
    registry.attach(book, RUN_ID)
    refusal = Message(
        Error(code=protocol.SITE_REFUSED, reason="site site-a refuses to train"), reply_to=instruction(33)
    )
    grid = RecordingGrid({33: refusal})
    report = RoundReport(1)
    Exchange(grid, ReplyTimeout(1.0), registry).send([instruction(33)], "train", report)  # type: ignore[arg-type]
    assert report.refusals == {33: "intruder"}


def test_a_refusal_from_a_node_never_named_is_recorded_under_its_node_id() -> None:
    refusal = Message(
        Error(code=protocol.SITE_REFUSED, reason="site site-a refuses to train"), reply_to=instruction(33)
    )
    report = RoundReport(1)
    grid = RecordingGrid({33: refusal})
    Exchange(grid, ReplyTimeout(1.0), SiteRegistry()).send([instruction(33)], "train", report)  # type: ignore[arg-type]
    assert report.refusals == {33: "node 33"}


def test_a_damaged_book_is_refused_naming_the_file(book: SiteBook) -> None:
    book.path.parent.mkdir(parents=True)
    book.path.write_text(json.dumps({"format": 1, "sites": {"site-0": {"node_id": 1}}}))
    with pytest.raises(CohortInputError, match=r"site-book\.json is damaged"):
        book.read()


def _resent(site: Site, update: Update) -> Message:
    """The same signed entry sent again, as a site restored from an older backup would."""
    reply = site.reply()
    record = dict(reply.content.config_records[protocol.SITE])
    record[protocol.SITE_LEDGER_ENTRY] = update.entry.to_json()
    reply.content[protocol.SITE] = ConfigRecord(record)
    return reply


COHORT = str(Path(sys.executable).parent / "cohort")


def _cohort(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COHORT, *args],
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_change_of_ledger_key_is_the_coordinators_command_and_the_runs_audit_shows_it(tmp_path: Path) -> None:
    home, run_dir = tmp_path / "flwr", tmp_path / "run"
    book = SiteBook(site_book_path(home, "hospitals"))
    old, new = Site(tmp_path / "old", "hospital-a", node=11), Site(tmp_path / "new", "hospital-a", node=11)
    book.first_ledger_key("hospital-a", old.key_pem, run_id=3)
    result = _cohort(
        "site", "ledger-key", "hospital-a", "hospitals", "--key", str(new.ledger.public_key_file), home=home
    )
    assert result.returncode == 0, result.stderr
    fingerprints = [key.fingerprint for key in book.read()["hospital-a"].ledger_keys]
    assert fingerprints[1] in " ".join(result.stdout.split())
    run_dir.mkdir()
    update = check(run_of(book), new.reply())
    assert isinstance(update, Update)
    (run_dir / LEDGER_FILE).write_text(update.entry.to_json() + "\n")
    write_key_history(book.read(), run_dir)
    audited = _cohort("audit", str(run_dir), "--out", str(tmp_path / "audit"), home=home)
    assert audited.returncode == 0, audited.stderr
    said = " ".join(audited.stdout.split())
    assert f"hospital-a: ledger key {fingerprints[0]} (first seen in run 3," in said
    assert f"replaced by {fingerprints[1]} (set by the coordinator," in said


def test_a_ledger_key_for_a_site_the_book_never_saw_is_refused_in_one_line(tmp_path: Path) -> None:
    key = Site(tmp_path, "hospital-z", node=1).ledger.public_key_file
    result = _cohort("site", "ledger-key", "hospital-z", "hospitals", "--key", str(key), home=tmp_path / "flwr")
    assert result.returncode == 2 and result.stderr.startswith("error: no site hospital-z in "), result.stderr
    assert "Traceback" not in result.stderr
