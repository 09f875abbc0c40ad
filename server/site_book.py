"""The coordinator's site book: who each site is, across every run, on the coordinator's host.

A run alone cannot tell a site from an impostor: each run starts without memory, and the
first node to use a name would own it. The book remembers, for each site name:

- the SuperNode key the coordinator registered for it with Flower and the node id Flower
  returned (`cohort site register`): that node speaks as that name and no other;
- every ledger key the site has used, oldest first: the first one as first seen in a
  run, each later one set by the coordinator (`cohort site ledger-key`), never by a reply;
- the newest signed ledger entry the coordinator accepted under the current key, which is
  sent back to the site with every instruction (common.protocol.SITE_NEWEST_ENTRY).

Runs on one SuperLink may overlap, and the coordinator's commands may run meanwhile:
every change is a read, modify and atomic write under an exclusive lock on the book.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import CohortInputError
from common.privacy.ledger import LedgerEntry, key_fingerprint
from common.private_files import open_private, private_dir
from server.rundir import write_json_atomic

if TYPE_CHECKING:
    from server.run_config import RunConfig

SITE_BOOK_FILE = "site-book.json"
# In a run directory: every site's ledger keys as the book held them when the run started,
# so that `cohort audit` of the run shows each change of key the coordinator made.
SITE_KEYS_FILE = "site-keys.json"
FORMAT = 1


@dataclass
class LedgerKey:
    """A ledger key of a site: since when and how it became the site's (first seen in a
    run, or set by the coordinator), and the newest entry accepted under it."""

    public_key_pem: str
    since: str
    how: str
    newest_entry: str = ""

    @property
    def fingerprint(self) -> str:
        key = serialization.load_pem_public_key(self.public_key_pem.encode("ascii"))
        assert isinstance(key, Ed25519PublicKey), "only an Ed25519 key is ever booked"
        return key_fingerprint(key)


@dataclass
class BookedSite:
    """supernode_key, node_id: what `cohort site register` registered with Flower ('' and
    None for a site never registered, as in simulation, or unregistered since)."""

    supernode_key: str = ""
    node_id: int | None = None
    ledger_keys: list[LedgerKey] = field(default_factory=list)

    @property
    def ledger_key(self) -> LedgerKey | None:
        """The key the site's entries must verify against now."""
        return self.ledger_keys[-1] if self.ledger_keys else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BookedSite:
        return cls(
            str(data["supernode_key"]),
            None if data["node_id"] is None else int(data["node_id"]),
            [LedgerKey(**key) for key in data["ledger_keys"]],
        )


@dataclass(frozen=True)
class SiteBook:
    """The book in its file; `path`'s folder is created private on first write."""

    path: Path

    @classmethod
    def for_run(cls, run: RunConfig) -> SiteBook:
        """The run's book: its site-book, or the one in its federation home."""
        return cls((Path(run.site_book) if run.site_book else Path(run.federation_home) / SITE_BOOK_FILE).resolve())

    def read(self) -> dict[str, BookedSite]:
        """Every booked site by name; none before the first write."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
            return {name: BookedSite.from_json(site) for name, site in data["sites"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CohortInputError(
                f"site book {self.path} is damaged ({error}); restore it from your backup of the coordinator's state"
            ) from None

    @contextmanager
    def editing(self) -> Iterator[dict[str, BookedSite]]:
        """The sites, to change in place; written back atomically when the block ends
        without an exception, under the book's lock throughout."""
        private_dir(self.path.parent)
        with open_private(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sites = self.read()
            yield sites
            payload = {"format": FORMAT, "sites": {name: sites[name].to_json() for name in sorted(sites)}}
            write_json_atomic(self.path, payload)

    def first_ledger_key(self, name: str, public_key_pem: str, run_id: int) -> str:
        """Bind name to the ledger key it first presented, unless an overlapping run bound
        one meanwhile; returns the key bound."""
        with self.editing() as sites:
            site = sites.setdefault(name, BookedSite())
            if site.ledger_key is None:
                site.ledger_keys.append(LedgerKey(public_key_pem, now(), f"first seen in run {run_id}"))
            return site.ledger_keys[-1].public_key_pem

    def accepted(self, name: str, entry: LedgerEntry) -> None:
        """Remember the newest entry accepted from name under its current key (an
        overlapping run may have accepted a later one meanwhile)."""
        with self.editing() as sites:
            key = sites[name].ledger_key
            assert key is not None, "an entry is accepted only from a site whose key is bound"
            if not key.newest_entry or LedgerEntry.from_json(key.newest_entry).sequence < entry.sequence:
                key.newest_entry = entry.to_json()


def write_key_history(sites: dict[str, BookedSite], run_dir: Path) -> None:
    """The run's copy of each site's ledger keys: fingerprint, since when and how."""
    history = {
        name: [{"fingerprint": key.fingerprint, "since": key.since, "how": key.how} for key in site.ledger_keys]
        for name, site in sorted(sites.items())
    }
    write_json_atomic(run_dir / SITE_KEYS_FILE, history)


def key_changes(run_dir: Path) -> list[str]:
    """One line per change of a site's ledger key in a run directory's copy; none without one."""
    file = run_dir / SITE_KEYS_FILE
    if not file.is_file():
        return []
    changes = []
    for name, keys in json.loads(file.read_text(encoding="utf-8")).items():
        for old, new in itertools.pairwise(keys):
            changes.append(
                f"{name}: ledger key {old['fingerprint']} ({old['how']}, {old['since']}) replaced by "
                f"{new['fingerprint']} ({new['how']}, {new['since']}); "
                f"entries signed by the earlier key verify only against it"
            )
    return changes


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
