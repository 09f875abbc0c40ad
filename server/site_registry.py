"""Who each site is: its name and ledger key, bound to the node id Flower assigned it.

A site is known by the node id the SuperLink gives its SuperNode. Where the coordinator
registered its sites by name (server.site_book, `cohort site register`), a node speaks
for its registered name alone. Otherwise the first reply from a node binds the name it
claims. Either way a name may only be spoken for with its ledger key: the one the book
holds for it across runs (the key it first presented, or the one the coordinator set
since), and a node may only speak as the one name bound to it in the run. The
name-to-key binding outlives node ids (a site that restarts gets a new node id) and is
checkpointed, so a resumed run holds every site to its key even without a book.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.ledger import LedgerEntry, verify_signature
from server.site_book import LedgerKey, SiteBook


@dataclass
class KnownSite:
    """A site's key and the newest ledger entry the server has accepted from it."""

    public_key_pem: str
    sequence: int = -1
    entry_hash: str = ""
    newest_entry: str = ""  # its JSON, which the site gets back with every instruction

    @property
    def public_key(self) -> Ed25519PublicKey:
        key = serialization.load_pem_public_key(self.public_key_pem.encode("ascii"))
        assert isinstance(key, Ed25519PublicKey)
        return key


@dataclass
class SiteRegistry:
    """sites: name -> KnownSite (checkpointed); nodes: node id -> name (this run only);
    registered: node id -> name, from the book (empty without registrations); book: where
    first-seen keys and accepted entries are kept across runs (None: this run alone)."""

    sites: dict[str, KnownSite] = field(default_factory=dict)
    nodes: dict[int, str] = field(default_factory=dict)
    registered: dict[int, str] = field(default_factory=dict)
    book: SiteBook | None = None
    run_id: int = 0

    def attach(self, book: SiteBook, run_id: int) -> None:
        """Hold this run to the book. Its keys and entries replace a checkpoint's: since
        the checkpoint the coordinator may have set a new key, and later runs accepted
        later entries."""
        self.book, self.run_id = book, run_id
        for name, booked in book.read().items():
            if booked.node_id is not None:
                self.registered[booked.node_id] = name
            if booked.ledger_key is not None:
                self.sites[name] = _known(booked.ledger_key)

    def name_of(self, node: int) -> str | None:
        return self.registered.get(node) or self.nodes.get(node)

    def known_as(self, node: int) -> str:
        """The site's name once it has one, the node id before: what reports say."""
        return self.name_of(node) or f"node {node}"

    def newest_entry_for(self, node: int) -> str:
        """The newest entry accepted from the site `node` speaks for; '' when none yet."""
        name = self.name_of(node)
        site = self.sites.get(name) if name is not None else None
        return site.newest_entry if site is not None else ""

    def claim_problem(self, node: int, claimed: str, live_nodes: set[int]) -> str | None:
        """None when `node` may speak as `claimed` in this run, else why not."""
        if self.registered:
            name = self.registered.get(node)
            if name is None:
                return (
                    f"node {node} is not registered by name "
                    f"(the coordinator registers sites with `cohort site register`)"
                )
            if name != claimed:
                return f"node {node} is registered as {name} but claims to be {claimed}"
        bound = self.nodes.get(node)
        if bound is not None:
            return None if bound == claimed else f"node {node} is {bound} but claims to be {claimed}"
        holder = next((n for n, name in self.nodes.items() if name == claimed and n in live_nodes), None)
        if holder is not None:
            return f"claims the name {claimed}, which node {holder} holds"
        return None

    def admit(self, node: int, claimed: str, key_pem: str, live_nodes: set[int]) -> str | None:
        """Bind or check who `node` is; None when it may speak as `claimed`, else why not."""
        problem = self.claim_problem(node, claimed, live_nodes)
        if problem is not None or node in self.nodes:
            return problem
        problem = _ed25519_problem(key_pem)
        if problem is not None:
            return problem
        key_pem = key_pem.strip() + "\n"
        if claimed not in self.sites:
            bound = self.book.first_ledger_key(claimed, key_pem, self.run_id) if self.book else key_pem
            self.sites[claimed] = KnownSite(bound)
        if self.sites[claimed].public_key_pem.strip() != key_pem.strip():
            return f"claims the name {claimed} with a ledger key that is not {claimed}'s"
        self.nodes[node] = claimed
        return None

    def check_entry(self, name: str, entry: LedgerEntry) -> str | None:
        """The entry must be signed by the site's key and continue what it sent before."""
        site = self.sites[name]
        if not verify_signature(entry, site.public_key):
            return f"its ledger entry does not verify against {name}'s key"
        if entry.sequence <= site.sequence:
            return f"its ledger entry has sequence {entry.sequence}, not after the {site.sequence} it already sent"
        if site.sequence >= 0 and entry.sequence == site.sequence + 1 and entry.previous_hash != site.entry_hash:
            return (
                f"its ledger entry {entry.sequence} does not link to entry "
                f"{site.sequence} it sent before: its ledger was rewritten"
            )
        return None

    def accept(self, name: str, entry: LedgerEntry) -> None:
        site = self.sites[name]
        site.sequence, site.entry_hash, site.newest_entry = entry.sequence, entry.entry_hash(), entry.to_json()
        if self.book is not None:
            self.book.accepted(name, entry)

    def to_json(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "public_key_pem": s.public_key_pem,
                "sequence": s.sequence,
                "entry_hash": s.entry_hash,
                "newest_entry": s.newest_entry,
            }
            for name, s in sorted(self.sites.items())
        }

    @classmethod
    def from_json(cls, data: dict[str, dict[str, Any]]) -> SiteRegistry:
        return cls(
            {
                name: KnownSite(
                    str(s["public_key_pem"]), int(s["sequence"]), str(s["entry_hash"]), str(s.get("newest_entry", ""))
                )
                for name, s in data.items()
            }
        )


def _known(key: LedgerKey) -> KnownSite:
    """What the registry needs of a booked key: it, and the newest entry accepted under it."""
    if not key.newest_entry:
        return KnownSite(key.public_key_pem)
    newest = LedgerEntry.from_json(key.newest_entry)
    return KnownSite(key.public_key_pem, newest.sequence, newest.entry_hash(), key.newest_entry)


def _ed25519_problem(key_pem: str) -> str | None:
    if not key_pem:
        return "sends no ledger public key"
    try:
        key = serialization.load_pem_public_key(key_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError):
        return "sends a ledger public key that is not PEM"
    if not isinstance(key, Ed25519PublicKey):
        return "sends a ledger public key that is not Ed25519"
    return None
