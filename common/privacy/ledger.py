"""The privacy ledger: one signed, hash-chained record per DP release or refusal.

Each site keeps its own ledger on its own disk, spanning every run on its dataset, so
the budget belongs to the dataset and not to a run. A record carries the hash of the one
before it and an Ed25519 signature by the site's key: editing, removing, reordering or
re-signing a record breaks the chain or a signature. Sites send their signed entries to
the coordinator, whose run directory keeps the same entries, in the same format.

Removing the last records leaves a valid chain, so beside the ledger a head file keeps
the count and the last hash, signed by the same key (no one without the key can rewrite
it); a site verifies chain and head before every round and refuses to train when either
does not hold (SiteLedger.verified_entries). A deployed site's key is made by the site's
own command (`cohort supernode` / `cohort site init`), never by a ClientApp, and that
command writes an empty signed head, so deleting the ledger and head together is noticed
too. What a signed head cannot tell is a whole older state restored from a backup: the
coordinator's copy of the site's newest entry does (client/ledger_guard.py).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import CohortInputError
from common.privacy.mechanisms import Mechanism
from common.private_files import open_private, private_dir

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


class RecordKind(StrEnum):
    """What a ledger record says happened."""

    RELEASE = "release"
    REFUSAL = "refusal"
    NON_PRIVATE = "non-private"  # training without DP, allowed by the site's policy: no guarantee
    KEY_ROTATION = "key-rotation"  # the ledger's signing key changes after this record (client/key_rotation.py)
    RETIREMENT = "retirement"  # the dataset is retired: the ledger's last record (client/retirement.py)


class Sampling(StrEnum):
    """What a record's sample rate q refers to, and so which amplification its epsilon claims."""

    POISSON = "poisson"
    NONE = "none"  # q = 1: no amplification by sampling claimed


LEDGER_FILE = "privacy_ledger.jsonl"
HEAD_FILE = "privacy_ledger.head.json"
PRIVATE_KEY_FILE = "ledger_key.pem"
PUBLIC_KEY_FILE = "ledger_key.pub.pem"
# The public key the ledger's first record was signed with, kept once the key is rotated:
# the chain is verified from it (the pin is its fingerprint).
ROOT_PUBLIC_KEY_FILE = "ledger_key.root.pub.pem"
# A rotation's new private key, until the state directory's key is replaced by it.
NEXT_KEY_FILE = "ledger_key.next.pem"
GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class LedgerRecord:
    """One DP release (or one refused release), enough to recompute the epsilon.

    kind: a RecordKind: 'release'; 'refusal' for a round the site declined; 'non-private'
        for training without DP that the site's policy allowed (it carries no guarantee).
        Records are built by the constructors below (release, non_private, refusal), the
        one place that says what each kind records.
    run_id: the Flower run that asked for the release.
    round: the federated round.
    site: the site that trained (or the server, for client-level DP).
    mechanism: the run's common.privacy.mechanisms.Mechanism: sample-level DP-SGD at a
        site, client-level DP-FedAvg at the server, or none ('' for code a site refused).
    noise_multiplier: sigma, noise std in units of clip_norm.
    sample_rate: q, the sampling probability of one example (or client) per step.
    sampling: the Sampling scheme q refers to ('poisson'; 'none' means q = 1, no amplification).
    steps: noisy steps in this release.
    clip_norm: C, the per-example (or per-update) L2 bound.
    delta: the delta at which epsilon is stated.
    epsilon: cumulative epsilon on this dataset after the release (RDP, the enforced figure).
    accountant: the accountant behind `epsilon`.
    budget_epsilon: the site's total budget when the record was written.
    dataset_hash: the identity of the site's data: SHA-256 of all of it, before any split;
        spending composes per dataset ('' for a refusal made before the site read its data:
        a run's code it did not install, or a run without the DP its policy requires).
    model_hash: SHA-256 of the released weights ('' for a refusal).
    config_hash: the fingerprint of the run config's site-facing settings
        (common.config.SiteRunConfig.site_fingerprint), which site and coordinator both
        compute; at the server, the whole run config's; 'fab:<FAB hash>' when the site
        refused to run the code a run shipped (client/site_runner.py).
    timestamp: seconds since the epoch.
    reason: why a refusal happened ('' for a release).
    mechanism_details: what a mechanism's accounting needs beyond sigma, q and steps, as
        canonical JSON ('' for the Gaussian mechanisms): the distributed Skellam release's
        noise variance and sensitivities in the sum's integer units, and the sites whose
        inputs and noise the sum holds.
    study_epsilon: the epsilon the site granted the run's study (client/study_grant.py).
    fab_hash: the SHA-256 of the FAB the coordinator submitted for the run (a deployed site).
    model: the run's model architecture.
    coordinator: the SuperLink the site answered ('simulation' for a simulated site).
    These five are OPTIONAL_FIELDS: left out of the record (so of what is signed) where
    empty, so that the ledgers written before they existed still verify.
    """

    kind: str
    run_id: int
    round: int
    site: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    sampling: str
    steps: int
    clip_norm: float
    delta: float
    epsilon: float
    accountant: str
    budget_epsilon: float
    dataset_hash: str
    model_hash: str
    config_hash: str
    timestamp: float = field(default_factory=time.time)
    reason: str = ""
    mechanism_details: str = ""
    study_epsilon: float = 0.0
    fab_hash: str = ""
    model: str = ""
    coordinator: str = ""

    @classmethod
    def release(
        cls,
        spender: Spender,
        mechanism: Mechanism,
        noise: Noise,
        epsilon: float,
        accountant: str,
        model_hash: str,
        mechanism_details: str = "",
    ) -> LedgerRecord:
        """A DP release: `noise` protected the model with hash `model_hash`, and the
        spender's epsilon under `accountant` stands at `epsilon` after it."""
        return dataclasses.replace(
            cls._of(RecordKind.RELEASE, spender, mechanism, noise, epsilon, accountant, model_hash),
            mechanism_details=mechanism_details,
        )

    @classmethod
    def non_private(
        cls, spender: Spender, mechanism: Mechanism, steps: int, clip_norm: float, accountant: str, model_hash: str
    ) -> LedgerRecord:
        """Training without noise of the spender's own (its policy allowed it): no guarantee
        of its own, whatever `mechanism` may add after it."""
        return cls._of(
            RecordKind.NON_PRIVATE,
            spender,
            mechanism,
            Noise(steps=steps, clip_norm=clip_norm),
            0.0,
            accountant,
            model_hash,
        )

    @classmethod
    def refusal(
        cls,
        spender: Spender,
        reason: str,
        epsilon: float,
        accountant: str,
        mechanism: str = "",
        noise: Noise | None = None,
    ) -> LedgerRecord:
        """A round the spender declined, and why; `epsilon`: what it had spent, and `noise`
        what the round would have applied, when it knew."""
        return cls._of(RecordKind.REFUSAL, spender, mechanism, noise or Noise(), epsilon, accountant, "", reason)

    @classmethod
    def about_the_ledger(cls, kind: RecordKind, before: LedgerRecord, reason: str) -> LedgerRecord:
        """A record about the ledger itself (a key rotation, the dataset's retirement): no
        release; the site, budget, data and epsilon as the record `before` it left them."""
        return cls(
            kind=kind, run_id=0, round=0, site=before.site, mechanism="", noise_multiplier=0.0, sample_rate=0.0,
            sampling=Sampling.NONE, steps=0, clip_norm=0.0, delta=before.delta, epsilon=before.epsilon,
            accountant=before.accountant, budget_epsilon=before.budget_epsilon, dataset_hash=before.dataset_hash,
            model_hash="", config_hash="", reason=reason,
        )  # fmt: skip

    @classmethod
    def _of(
        cls,
        kind: RecordKind,
        spender: Spender,
        mechanism: str,
        noise: Noise,
        epsilon: float,
        accountant: str,
        model_hash: str,
        reason: str = "",
    ) -> LedgerRecord:
        return cls(
            kind=kind,
            run_id=spender.run_id,
            round=spender.round,
            site=spender.site,
            mechanism=mechanism,
            noise_multiplier=noise.noise_multiplier,
            sample_rate=noise.sample_rate,
            sampling=noise.sampling,
            steps=noise.steps,
            clip_norm=noise.clip_norm,
            delta=spender.delta,
            epsilon=epsilon,
            accountant=accountant,
            budget_epsilon=spender.budget_epsilon,
            dataset_hash=spender.dataset_hash,
            model_hash=model_hash,
            config_hash=spender.config_hash,
            reason=reason,
            study_epsilon=spender.study.epsilon,
            fab_hash=spender.study.fab_hash,
            model=spender.study.model,
            coordinator=spender.study.coordinator,
        )


@dataclass(frozen=True)
class Spender:
    """What every record of one spender's round shares: who spends (a site, or the server
    for client-level DP), in which run and round, on which data, under which run config
    and budget. Fields as in LedgerRecord."""

    run_id: int
    round: int
    site: str
    delta: float
    budget_epsilon: float
    dataset_hash: str
    config_hash: str
    study: Study = field(default_factory=lambda: Study())  # noqa: PLW0108 - Study is defined below


@dataclass(frozen=True)
class Study:
    """What a site records of the study a round belongs to (LedgerRecord's study_epsilon,
    fab_hash, model and coordinator)."""

    epsilon: float = 0.0
    fab_hash: str = ""
    model: str = ""
    coordinator: str = ""


OPTIONAL_FIELDS = ("mechanism_details", "study_epsilon", "fab_hash", "model", "coordinator")


def record_json(record: LedgerRecord) -> dict[str, Any]:
    """The record as stored and signed: its OPTIONAL_FIELDS only where they say something."""
    values = dataclasses.asdict(record)
    return {key: value for key, value in values.items() if key not in OPTIONAL_FIELDS or value}


@dataclass(frozen=True)
class Noise:
    """The Gaussian mechanism of a release: sigma in units of C, q and what q assumes, the
    noisy steps taken, and C. Fields as in LedgerRecord; the default is no noise at all."""

    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    sampling: Sampling = Sampling.POISSON
    steps: int = 0
    clip_norm: float = 0.0


@dataclass(frozen=True)
class LedgerEntry:
    """A record as it stands in a ledger: its position, its link and its signature.

    next_key: in a key rotation's entry only (client/key_rotation.py), the raw new public
    key, base64: every later entry and the head are signed by it. Absent from the JSON and
    the signature otherwise, so entries written before rotations existed still verify.
    """

    sequence: int
    previous_hash: str
    record: LedgerRecord
    signature: str
    next_key: str = ""

    def signed_payload(self) -> bytes:
        return _canonical(self._linked_fields())

    def _linked_fields(self) -> dict[str, Any]:
        fields = {"sequence": self.sequence, "previous_hash": self.previous_hash, "record": record_json(self.record)}
        return {**fields, "next_key": self.next_key} if self.next_key else fields

    def successor_key(self) -> Ed25519PublicKey | None:
        """The key that signs from the next entry on, when this entry rotates it; raises
        ValueError for a next_key that is no Ed25519 key."""
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.next_key)) if self.next_key else None

    def entry_hash(self) -> str:
        return hashlib.sha256(self.signed_payload()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({**self._linked_fields(), "signature": self.signature}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LedgerEntry:
        data = json.loads(text)
        return cls(
            int(data["sequence"]),
            str(data["previous_hash"]),
            LedgerRecord(**data["record"]),
            str(data["signature"]),
            str(data.get("next_key", "")),
        )


class LedgerBroken(CohortInputError):
    """The site's ledger does not match its head or its key: the site must not train."""


class SiteLedger:
    """A site's ledger in its state directory, with the site's signing key and head beside it.

    create_key: make the key (and an empty head) when there is none; only the site's own
    setup (and a simulated site, which belongs to the researcher) does that, a deployed
    ClientApp never.
    pinned_key: the fingerprint of the key the site's policy pins (client.policy), if any:
    a state directory holding another key refuses to train (its key was swapped).
    """

    def __init__(self, state_dir: Path, create_key: bool = True, pinned_key: str | None = None) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LEDGER_FILE
        self.head_path = state_dir / HEAD_FILE
        self.pinned_key = pinned_key
        if not create_key and not (state_dir / PRIVATE_KEY_FILE).exists():
            raise LedgerBroken(
                f"site state {state_dir} has no signing key {PRIVATE_KEY_FILE}; the site refuses "
                f"to train until its operator runs `cohort site init --state-dir {state_dir}` "
                "(or `cohort supernode`, which does it on first start)"
            )
        self._key = _load_or_create_key(state_dir, self.head_path)

    @property
    def public_key_file(self) -> Path:
        return self.state_dir / PUBLIC_KEY_FILE

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key that signs the site's next entry."""
        return self._key.public_key()

    @property
    def root_key_file(self) -> Path:
        """The public key the ledger's chain starts from: the first key, once rotated."""
        root = self.state_dir / ROOT_PUBLIC_KEY_FILE
        return root if root.exists() else self.public_key_file

    def root_key(self) -> Ed25519PublicKey:
        return load_public_key(self.root_key_file)

    def fingerprint(self) -> str:
        """The fingerprint of the chain's first key: what the policy pins and the auditor
        records; a rotation keeps it."""
        return key_fingerprint(self.root_key())

    def signing_keys(self) -> list[Ed25519PublicKey]:
        """Every key the site's ledger has been signed with, first to current."""
        return chain_keys(self.entries(), self.root_key())

    def entries(self) -> list[LedgerEntry]:
        return read_entries(self.path) if self.path.exists() else []

    def verified_entries(self) -> list[LedgerEntry]:
        """The whole ledger, after checking the key against the policy's pin, every link and
        signature against the key, and the count and last hash against the signed head.
        Raises LedgerBroken, with one line for the site's operator, when anything does not hold."""
        if self.pinned_key is not None and self.fingerprint() != self.pinned_key:
            raise LedgerBroken(
                f"site state {self.state_dir} holds ledger key {self.fingerprint()}, "
                f"not the key {self.pinned_key} its policy pins (ledger-key): the key was replaced; "
                "the site refuses to train until its operator restores "
                f"{PRIVATE_KEY_FILE} (with the ledger and {HEAD_FILE}) from backup"
            )
        if (self.state_dir / NEXT_KEY_FILE).exists():
            raise LedgerBroken(
                f"site state {self.state_dir} holds a key rotation that did not finish; "
                "the site refuses to train until its operator runs "
                f"`cohort site rotate-key --state-dir {self.state_dir}` again, which finishes it"
            )
        problem = ledger_problem(self.path, self.head_path, self.root_key())
        if problem is None and key_fingerprint(self.signing_keys()[-1]) != key_fingerprint(self.public_key):
            problem = (
                f"names {key_fingerprint(self.signing_keys()[-1])} as its signing key, not the state directory's key"
            )
        if problem is not None:
            raise LedgerBroken(
                f"site ledger {self.path} {problem}; the site refuses to train until its operator restores the ledger "
                f"(and {HEAD_FILE}) from backup and checks it with "
                f"`cohort audit verify {self.state_dir} --public-key {self.root_key_file}`"
            )
        entries = self.entries()
        if entries and entries[-1].record.kind == RecordKind.RETIREMENT:
            raise LedgerBroken(
                f"site ledger {self.path} ends with the retirement of its dataset (record {len(entries)}); "
                "a retired dataset trains no more"
            )
        return entries

    def adopt(self) -> int:
        """Write the signed head of a ledger that has none, or sign a head written before
        heads were signed, after verifying the whole chain against the site's key (and, for
        an unsigned head, that it names the chain's last record); the operator's act,
        through `cohort site init`. Returns the number of records the head now covers."""
        head = read_head(self.head_path) if self.head_path.exists() else None
        if head is not None and head.signature:
            return head.count
        entries = self.entries()
        broken = verify_chain(entries, self.root_key())
        if broken is not None:
            raise LedgerBroken(
                f"site ledger {self.path} is broken: {broken}; restore it from backup before adopting it"
            )
        last_hash = entries[-1].entry_hash() if entries else GENESIS_HASH
        if head is not None and (head.count, head.last_hash) != (len(entries), last_hash):
            raise LedgerBroken(
                f"site ledger {self.path} holds {len(entries)} record(s) but its unsigned head says {head.count}: "
                f"restore the ledger and {HEAD_FILE} from backup before adopting them"
            )
        write_head(self.head_path, sign_head(self._key, len(entries), last_hash))
        return len(entries)

    def append(self, record: LedgerRecord) -> LedgerEntry:
        """Sign and append; fsync before returning, so an acknowledged release is never lost.

        The head is rewritten after the record is on disk: a crash between the two leaves a
        ledger one signed record ahead of its head, which verification accepts.
        """
        existing = self.entries()
        entry = sign_entry(self._key, len(existing), existing[-1].entry_hash() if existing else GENESIS_HASH, record)
        self._write([entry], len(existing))
        return entry

    def extend(self, entries: list[LedgerEntry]) -> None:
        """Append entries signed before (a site's own, as the coordinator kept them), each
        continuing the chain: the ledger is verified first and the entries must link on."""
        existing = self.verified_entries()
        broken = verify_chain(existing + entries, self.root_key())
        if broken is not None:
            raise LedgerBroken(f"the entries to import do not continue site ledger {self.path}: {broken}")
        self._write(entries, len(existing))

    def rotate(self, record: LedgerRecord) -> LedgerEntry:
        """Append `record` signed by the current key and naming a new one, which signs
        everything after it (the head included). The ledger is verified first; the first
        key's public half is kept as ROOT_PUBLIC_KEY_FILE, the chain's start. The new key is
        on disk (NEXT_KEY_FILE) before the entry naming it, so a crash between leaves what
        finish_rotation completes."""
        existing = self.verified_entries()
        root = self.state_dir / ROOT_PUBLIC_KEY_FILE
        if not root.exists():
            root.write_bytes(self.public_key_file.read_bytes())  # meant to be shared, like the public key
        new = Ed25519PrivateKey.generate()
        _write_private_key(self.state_dir / NEXT_KEY_FILE, new)
        raw = new.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        unsigned = LedgerEntry(
            len(existing),
            existing[-1].entry_hash() if existing else GENESIS_HASH,
            record,
            signature="",
            next_key=base64.b64encode(raw).decode(),
        )
        entry = dataclasses.replace(
            unsigned, signature=base64.b64encode(self._key.sign(unsigned.signed_payload())).decode()
        )
        with open_private(self.path, "a") as stream:
            stream.write(entry.to_json() + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.finish_rotation()
        return entry

    def finish_rotation(self) -> bool:
        """Make the key a rotation entry names the state directory's key, when the last
        rotation stopped before that (NEXT_KEY_FILE is left and the chain names it).
        Returns whether there was one to finish; a next key no entry names (the rotation
        stopped before its entry) signs nothing and is removed."""
        pending = self.state_dir / NEXT_KEY_FILE
        if not pending.exists():
            return False
        new = _read_private_key(pending)
        entries = self.entries()
        broken = verify_chain(entries, self.root_key())
        if broken is not None:
            raise LedgerBroken(f"site ledger {self.path} is broken: {broken}; restore it from backup")
        if key_fingerprint(chain_keys(entries, self.root_key())[-1]) != key_fingerprint(new.public_key()):
            pending.unlink()
            return False
        os.replace(pending, self.state_dir / PRIVATE_KEY_FILE)
        self._key = new
        self.public_key_file.write_bytes(
            new.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        write_head(self.head_path, sign_head(new, len(entries), entries[-1].entry_hash()))
        return True

    def _write(self, entries: list[LedgerEntry], existing: int) -> None:
        with open_private(self.path, "a") as stream:
            stream.write("".join(entry.to_json() + "\n" for entry in entries))
            stream.flush()
            os.fsync(stream.fileno())
        write_head(self.head_path, sign_head(self._key, existing + len(entries), entries[-1].entry_hash()))


def ledger_problem(path: Path, head_path: Path, public_key: Ed25519PublicKey) -> str | None:
    """What is wrong with a ledger and its head under `public_key` (the chain's first key),
    as the end of a sentence starting with the ledger's path; None when chain and head hold."""
    if not head_path.exists():
        return f"has no head file {HEAD_FILE} beside it: it was deleted"
    head = read_head(head_path)
    try:
        entries = read_entries(path) if path.exists() else []
    except CohortInputError as unreadable:
        return f"cannot be read ({unreadable})"
    broken = verify_chain(entries, public_key)
    if broken is not None:
        return f"is broken: {broken}"
    if not head.signature:
        return (
            f"has an unsigned head {HEAD_FILE}: it was rewritten without the key, or written before heads were "
            "signed (then `cohort site init` signs it once it names the chain's last record)"
        )
    if not head.signed_by(chain_keys(entries, public_key)[-1]):
        return f"has a head {HEAD_FILE} not signed by this key: it was rewritten"
    if not path.exists() and head.count:
        return f"is missing while its head says it holds {head.count} record(s)"
    if len(entries) < head.count:
        return f"holds {len(entries)} record(s) but its head says {head.count}: records were removed from its end"
    if head.count and entries[head.count - 1].entry_hash() != head.last_hash:
        return f"record {head.count} is not the one its head names: the ledger was replaced"
    return None


@dataclass(frozen=True)
class LedgerHead:
    """How many records the ledger holds and the hash of the last one, signed by the
    ledger's key ('' for a head written before heads were signed)."""

    count: int
    last_hash: str
    signature: str = ""

    def signed_payload(self) -> bytes:
        return _canonical({"count": self.count, "last_hash": self.last_hash})

    def signed_by(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(base64.b64decode(self.signature), self.signed_payload())
            return True
        except (InvalidSignature, ValueError):
            return False


def sign_head(key: Ed25519PrivateKey, count: int, last_hash: str) -> LedgerHead:
    unsigned = LedgerHead(count, last_hash)
    return dataclasses.replace(unsigned, signature=base64.b64encode(key.sign(unsigned.signed_payload())).decode())


def read_head(path: Path) -> LedgerHead:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LedgerHead(int(data["count"]), str(data["last_hash"]), str(data.get("signature", "")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise LedgerBroken(f"{path} is not a ledger head; restore it from backup") from None


def write_head(path: Path, head: LedgerHead) -> None:
    """Atomically (a crashed process leaves the old head or the new one, never half of
    one), but not flushed to disk: the ledger record it follows already is, and each flush
    costs a simulated site-round a few milliseconds. After a power loss the head may name
    an earlier record, which verification accepts (the ledger holds at least as many); on
    a file system that does not order a rename after the data it replaces, it may be
    unreadable, and the site then refuses to train until its operator restores it. Either
    way no release is lost and no site spends more."""
    temporary = path.with_suffix(".tmp")
    with open_private(temporary, "w") as stream:
        json.dump({"count": head.count, "last_hash": head.last_hash, "signature": head.signature}, stream)
    os.replace(temporary, path)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, for an auditor to record out of band."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def read_entries(path: Path) -> list[LedgerEntry]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CohortInputError(
            f"ledger {path} does not exist; give a run directory or a site's privacy_ledger.jsonl"
        ) from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.from_json(line))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CohortInputError(
                f"{path}: record {number} is not a ledger record "
                f"({type(error).__name__}); the file is truncated or edited"
            ) from None
    return entries


def sign_entry(key: Ed25519PrivateKey, sequence: int, previous_hash: str, record: LedgerRecord) -> LedgerEntry:
    """`record` as the entry at `sequence` after the entry hashing to `previous_hash`, signed."""
    unsigned = LedgerEntry(sequence, previous_hash, record, signature="")
    return dataclasses.replace(unsigned, signature=base64.b64encode(key.sign(unsigned.signed_payload())).decode())


def verify_chain(entries: list[LedgerEntry], public_key: Ed25519PublicKey) -> str | None:
    """None if every link and signature holds, else a sentence naming the first bad record.
    `public_key` signs from the first entry on, each rotation's next key after it."""
    previous, key = GENESIS_HASH, public_key
    for position, entry in enumerate(entries):
        label = f"record {position + 1} (round {entry.record.round}, run {entry.record.run_id})"
        if entry.sequence != position:
            return (
                f"{label} has sequence number {entry.sequence}, expected {position}: a record was removed or reordered"
            )
        if entry.previous_hash != previous:
            return f"{label} does not link to the record before it: a record was removed, reordered or edited"
        if not verify_signature(entry, key):
            return f"{label} has a signature that does not match this key: it was edited or signed by another key"
        previous = entry.entry_hash()
        try:
            key = entry.successor_key() or key
        except ValueError:
            return f"{label} rotates to a key that is not an Ed25519 public key"
    return None


def chain_keys(entries: list[LedgerEntry], root: Ed25519PublicKey) -> list[Ed25519PublicKey]:
    """Every key of a verified chain, from `root` to the one that signs its next entry."""
    return [root, *(key for key in (entry.successor_key() for entry in entries) if key is not None)]


def verify_signature(entry: LedgerEntry, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(base64.b64decode(entry.signature), entry.signed_payload())
        return True
    except (InvalidSignature, ValueError):
        return False


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise CohortInputError(
            f"public key {path} does not exist; sites export it as {PUBLIC_KEY_FILE} in their state directory"
        ) from None
    except ValueError:
        raise CohortInputError(f"{path} is not a PEM public key; use the site's {PUBLIC_KEY_FILE}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CohortInputError(f"{path} is not an Ed25519 key; ledgers are signed with Ed25519")
    return key


def model_hash(arrays: ArrayRecord) -> str:
    """The model hash a release records and the server checks against what the reply
    carries: SHA-256 over the arrays' bytes, in the order the record holds (and sends) them."""
    return sha256_hex(*(array.numpy().tobytes() for array in arrays.values()))


def sha256_hex(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def history_of(records: Iterable[LedgerRecord]) -> tuple[tuple[float, float, int], ...]:
    """The (sigma, q, steps) entries an accountant composes, in ledger order."""
    return tuple((r.noise_multiplier, r.sample_rate, r.steps) for r in records)


def iter_releases(entries: list[LedgerEntry], dataset_hash: str) -> Iterator[LedgerRecord]:
    return (e.record for e in entries if e.record.kind == RecordKind.RELEASE and e.record.dataset_hash == dataset_hash)


def _load_or_create_key(state_dir: Path, head_path: Path) -> Ed25519PrivateKey:
    """The site's signing key, created on first use with 0600 permissions, with an empty head."""
    private_dir(state_dir)
    key_file = state_dir / PRIVATE_KEY_FILE
    if key_file.exists():
        return _read_private_key(key_file)
    key = Ed25519PrivateKey.generate()
    _write_private_key(key_file, key)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (state_dir / PUBLIC_KEY_FILE).write_bytes(public)  # meant to be shared: an auditor verifies the ledger with it
    if not head_path.exists() and not (state_dir / LEDGER_FILE).exists():
        write_head(head_path, sign_head(key, 0, GENESIS_HASH))
    return key


def _read_private_key(key_file: Path) -> Ed25519PrivateKey:
    if key_file.stat().st_mode & 0o077:
        raise CohortInputError(f"{key_file} is readable by others; run `chmod 600 {key_file}`")
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CohortInputError(f"{key_file} is not an Ed25519 key; move it away and a new one is made")
    return key


def _write_private_key(key_file: Path, key: Ed25519PrivateKey) -> None:
    """0600 from its creation; fsynced, since a ledger entry may name its public half."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with open_private(key_file, "wb") as stream:
        stream.write(pem)
        stream.flush()
        os.fsync(stream.fileno())


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
