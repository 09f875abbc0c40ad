"""Who each site is: its name and ledger key, bound to the node id Flower assigned it.

A site is known by the node id the SuperLink gives its SuperNode. The first reply from a
node binds the name it claims and the ledger public key it presents; from then on that
node may only speak as that name, and a name may only be spoken for with its key. The
name-to-key binding outlives node ids (a site that restarts gets a new node id) and is
checkpointed, so a resumed run holds every site to the key it first used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.ledger import LedgerEntry, verify_signature


@dataclass
class KnownSite:
    """A site's key and the newest ledger entry the server has accepted from it."""

    public_key_pem: str
    sequence: int = -1
    entry_hash: str = ""

    @property
    def public_key(self) -> Ed25519PublicKey:
        key = serialization.load_pem_public_key(self.public_key_pem.encode("ascii"))
        assert isinstance(key, Ed25519PublicKey)
        return key


@dataclass
class SiteRegistry:
    """sites: name -> KnownSite (checkpointed); nodes: node id -> name (this run only)."""

    sites: dict[str, KnownSite] = field(default_factory=dict)
    nodes: dict[int, str] = field(default_factory=dict)

    def name_of(self, node: int) -> str | None:
        return self.nodes.get(node)

    def known_as(self, node: int) -> str:
        """The site's name once it has one, the node id before: what reports say."""
        return self.nodes.get(node) or f"node {node}"

    def admit(self, node: int, claimed: str, key_pem: str, live_nodes: set[int]) -> str | None:
        """Bind or check who `node` is; None when it may speak as `claimed`, else why not."""
        bound = self.nodes.get(node)
        if bound is not None:
            return None if bound == claimed else f"node {node} is {bound} but claims to be {claimed}"
        holder = next((n for n, name in self.nodes.items() if name == claimed and n in live_nodes), None)
        if holder is not None:
            return f"claims the name {claimed}, which node {holder} holds"
        problem = _ed25519_problem(key_pem)
        if problem is not None:
            return problem
        known = self.sites.get(claimed)
        if known is not None and known.public_key_pem.strip() != key_pem.strip():
            return f"claims the name {claimed} with a ledger key that is not {claimed}'s"
        if known is None:
            self.sites[claimed] = KnownSite(key_pem.strip() + "\n")
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
        site.sequence, site.entry_hash = entry.sequence, entry.entry_hash()

    def to_json(self) -> dict[str, dict[str, object]]:
        return {
            name: {"public_key_pem": s.public_key_pem, "sequence": s.sequence, "entry_hash": s.entry_hash}
            for name, s in sorted(self.sites.items())
        }

    @classmethod
    def from_json(cls, data: dict[str, dict[str, Any]]) -> SiteRegistry:
        return cls(
            {
                name: KnownSite(str(s["public_key_pem"]), int(s["sequence"]), str(s["entry_hash"]))
                for name, s in data.items()
            }
        )


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
