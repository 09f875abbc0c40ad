"""Sites by name: the coordinator registers a site's SuperNode key with Flower and binds
it to the site's name, in the site book (server.site_book) of the SuperLink connection.

Flower knows a SuperNode by its key and the node id it assigns at registration, and
shows no name the ServerApp could trust. `cohort site register` does both at once: it
registers the key with `flwr supernode register` and records name, key and node id in
the book, where every run of this connection reads them (`cohort run` passes the book).
Listing, unregistering and a change of ledger key then use the site's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import CohortInputError
from common.privacy.ledger import key_fingerprint, load_public_key
from deploy.certificates import supernode_public_key_line, validate_site_name
from deploy.flower_runtime import flwr_json
from server.site_book import BookedSite, LedgerKey, SiteBook, now

SITE_BOOKS_DIR = "site-books"


def site_book_path(flwr_home: Path, connection: str) -> Path:
    """The book of a SuperLink connection, in the coordinator's Flower home beside it."""
    return (flwr_home / SITE_BOOKS_DIR / f"{connection}.json").resolve()


@dataclass(frozen=True)
class SiteListing:
    """A booked site as `cohort site list` shows it: status is Flower's ('online',
    'offline', ...) or 'unregistered'."""

    name: str
    node_id: int | None
    status: str
    ledger_key: str
    newest_sequence: int | None
    key_changes: int


@dataclass(frozen=True)
class Registrar:
    """The coordinator's registrations on one SuperLink connection."""

    connection: str
    flwr_home: Path

    @property
    def book(self) -> SiteBook:
        return SiteBook(site_book_path(self.flwr_home, self.connection))

    def register(self, name: str, public_key: Path) -> int:
        """Register the site's SuperNode key with Flower under `name`; returns its node id."""
        validate_site_name(name)
        key_line = supernode_public_key_line(public_key, name)
        with self.book.editing() as sites:
            site = sites.setdefault(name, BookedSite())
            if site.node_id is not None:
                raise CohortInputError(
                    f"site {name} is registered already, as node {site.node_id}; to give it another key, "
                    f"`cohort site unregister {name} {self.connection}` first"
                )
            holder = next(
                (other for other, s in sites.items() if s.supernode_key.split()[:2] == key_line.split()[:2]), None
            )
            if holder is not None:
                raise CohortInputError(
                    f"{public_key} is registered already, for site {holder}; each site has its own key"
                )
            answer = self._flwr("supernode", "register", str(public_key.resolve()), options=("--name", name))
            site.supernode_key, site.node_id = key_line, int(answer["node-id"])
            return site.node_id

    def unregister(self, name: str) -> int:
        """Unregister the site's SuperNode with Flower; its name keeps its ledger key and
        newest entry, for when it is registered again. Returns the node id it had."""
        with self.book.editing() as sites:
            site = sites.get(name)
            if site is None or site.node_id is None:
                raise CohortInputError(
                    f"site {name} is not registered on {self.connection}; "
                    f"`cohort site list {self.connection}` lists those that are"
                )
            node_id = site.node_id
            self._flwr("supernode", "unregister", str(node_id))
            site.supernode_key, site.node_id = "", None
            return node_id

    def set_ledger_key(self, name: str, public_key_pem: Path) -> str:
        """The coordinator's explicit change of a site's ledger key (a lost or rotated key,
        checked with the site out of band); returns the new key's fingerprint."""
        try:
            fingerprint = key_fingerprint(load_public_key(public_key_pem))
        except (OSError, ValueError, TypeError) as error:
            raise CohortInputError(
                f"{public_key_pem} is not a site's ledger public key ({error}); "
                f"ask the site for the ledger_key.pub.pem in its state directory"
            ) from None
        pem = public_key_pem.read_text(encoding="ascii").strip() + "\n"
        with self.book.editing() as sites:
            site = sites.get(name)
            if site is None:
                raise CohortInputError(
                    f"no site {name} in {self.book.path}; `cohort site list {self.connection}` lists the sites"
                )
            if site.ledger_key is not None and site.ledger_key.public_key_pem.strip() == pem.strip():
                raise CohortInputError(f"{public_key_pem} is site {name}'s ledger key already")
            site.ledger_keys.append(LedgerKey(pem, now(), "set by the coordinator"))
        return fingerprint

    def listing(self) -> list[SiteListing]:
        """Every booked site by name, with Flower's status of its node."""
        status = {int(node["node-id"]): str(node["status"]) for node in self._flwr("supernode", "list")["nodes"]}
        return [_listing(name, site, status) for name, site in sorted(self.book.read().items())]

    def _flwr(self, *command: str, options: tuple[str, ...] = ()) -> dict[str, Any]:
        return flwr_json(command, self.connection, self.flwr_home, options)


def _listing(name: str, site: BookedSite, status: dict[int, str]) -> SiteListing:
    key = site.ledger_key
    fingerprint = key.fingerprint if key is not None else ""
    newest = json.loads(key.newest_entry)["sequence"] if key is not None and key.newest_entry else None
    node_status = "unregistered" if site.node_id is None else status.get(site.node_id, "unknown to the SuperLink")
    return SiteListing(name, site.node_id, node_status, fingerprint, newest, max(len(site.ledger_keys) - 1, 0))
