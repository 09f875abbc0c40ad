"""What a site checks of its own ledger before it decides anything about a round.

Its state directory must hold the key its policy pins, a chain every link and signature
of which verifies under that key, and a signed head naming the chain's end
(common.privacy.ledger.SiteLedger.verified_entries). None of that tells a whole older
state, restored from a backup, from the current one: both are signed by the site's key.
The coordinator therefore sends, with every instruction, the newest ledger entry it has
accepted from the site (protocol.SITE_NEWEST_ENTRY). An entry signed by the site's own key
that its ledger does not hold means the ledger was rolled back: the site refuses every
round until its operator imports the missing entries (`cohort site import`). A coordinator
can withhold the entry, never forge a later one: it holds no key of the site's.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Message

from client.policy import SiteConfig, pin_ledger_key
from common import protocol
from common.privacy.ledger import LedgerBroken, LedgerEntry, SiteLedger, verify_signature


class LedgerBehind(LedgerBroken):
    """The site's ledger lacks an entry the site signed and the coordinator holds.

    reason: the line for the coordinator (no local path); str(): the operator's line."""

    def __init__(self, operator_line: str, reason: str) -> None:
        super().__init__(operator_line)
        self.reason = reason


def open_site_ledger(site: SiteConfig) -> SiteLedger:
    """The site's ledger under the key its policy pins. A simulated site (the researcher's)
    makes its key on first use and pins it then; a deployed one never makes a key here."""
    if site.deployed and site.ledger_key is None:
        raise LedgerBroken(
            f"site {site.name}'s policy pins no ledger key; the site refuses to train until its operator runs "
            f"`cohort site init --state-dir {site.state_dir}`, which pins it"
        )
    ledger = SiteLedger(site.state_dir, create_key=not site.deployed, pinned_key=site.ledger_key)
    if site.ledger_key is None:
        pin_ledger_key(site.state_dir, ledger.fingerprint())
    return ledger


def newest_entry(message: Message) -> str | None:
    """The coordinator's copy of the site's newest entry, as the instruction carries it."""
    config = message.content.get(protocol.CONFIG) if message.has_content() else None
    value = config.get(protocol.SITE_NEWEST_ENTRY) if isinstance(config, ConfigRecord) else None
    return str(value) if value else None


def check_not_behind(site: SiteConfig, ledger: SiteLedger, entries: list[LedgerEntry], newest: str | None) -> None:
    """Raise LedgerBehind when `newest` is not an entry the site's ledger holds at its
    sequence. An entry that no key of the site's ledger signed is refused too, not
    ignored: a state directory restored from before a key rotation knows only the old key,
    and a coordinator that sends something else gains only a refusal."""
    if newest is None:
        return
    try:
        entry = LedgerEntry.from_json(newest)
        signed = any(verify_signature(entry, key) for key in ledger.signing_keys())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        signed, entry = False, None
    if not signed or entry is None:
        gap = (
            "the coordinator's copy of its newest ledger entry is not signed by any key its ledger holds: its state "
            "directory was restored from before a key rotation, or the coordinator binds its name to another key"
        )
        raise LedgerBehind(
            f"site {site.name} refuses to train: {gap}; restore the newest backup of {site.state_dir} and import "
            "what it lacks (`cohort site import`), or ask the coordinator which key it holds for this site",
            f"site {site.name} refuses to train: {gap}",
        )
    held = len(entries)
    if entry.sequence < held and entries[entry.sequence].entry_hash() == entry.entry_hash():
        return
    label = f"record {entry.sequence + 1} (run {entry.record.run_id}, round {entry.record.round})"
    if entry.sequence < held:
        gap = (
            f"its ledger's {label} is not the one it signed and the coordinator holds: "
            "its ledger forked after a restore"
        )
        fix = "keep both copies and reconcile by hand (docs/site.md, Backup and restore); training resumes only then"
    else:
        gap = (
            f"its ledger holds {held} record(s) but the coordinator holds its signed {label}: "
            "it was restored from an older backup or cut short"
        )
        fix = (
            f"import the missing records from the coordinator's run directories with "
            f"`cohort site import --state-dir {site.state_dir} RUN_DIR...`"
        )
    raise LedgerBehind(
        f"site {site.name} refuses to train: {gap}; {fix}",
        f"site {site.name} refuses to train: {gap}; its operator must import the missing records (cohort site import)",
    )
