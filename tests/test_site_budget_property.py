"""Property: whatever runs a coordinator starts against one deployed site, with whatever
run configs and run ids, the site's ledger never shows more than the site's budget, under
any accountant the site enforces, and all of it is spent on one dataset identity; and
whatever is done to the site's state directory between runs (backups restored, ledgers
cut short or deleted, keys swapped, everything wiped), everything the site ever released
composes to no more than its budget."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from client.key_rotation import rotate_key
from client.ledger_guard import check_not_behind, open_site_ledger
from client.ledger_import import import_entries
from client.policy import SiteConfig
from client.privacy_plan import enforced_epsilon, plan_round, refusal_reason, round_steps
from client.site_data import local_site_data
from common.config import ACCOUNTANTS, SiteRunConfig
from common.errors import CohortInputError
from common.privacy.accounting import PrivacyState, composing_accountants, merged_history
from common.privacy.ledger import (
    GENESIS_HASH,
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    LedgerBroken,
    LedgerEntry,
    LedgerRecord,
    RecordKind,
    SiteLedger,
    history_of,
    iter_releases,
    sign_head,
    verify_signature,
    write_head,
)
from common.privacy.mechanisms import Mechanism
from deploy.launch import init_site_state
from tests.conftest import make_images

BUDGET = 3.0
DELTA = 1e-5

run_configs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "val-fraction": st.floats(0.05, 0.5),
        "batch-size": st.integers(8, 64),
        "rounds": st.integers(1, 3),
        "noise-multiplier": st.one_of(st.just(0.0), st.floats(0.3, 3.0)),
        "accountant": st.sampled_from(ACCOUNTANTS),
        "dp": st.booleans(),
        "site-allow-non-private": st.booleans(),
        "site-epsilon": st.floats(1.0, 1000.0),
        "federation-home": st.just("/tmp/elsewhere"),
    }
)
runs = st.lists(st.tuples(st.integers(0, 3), run_configs), min_size=1, max_size=3)


def _play(ledger: SiteLedger, site: SiteConfig, run_id: int, run: SiteRunConfig) -> None:
    """What the site's ClientApp decides each round of one run, with training replaced by
    the steps it would take."""
    data = local_site_data(str(site.data_path), site.split_seed, site.val_fraction)
    for server_round in range(1, run.training.rounds + 1):
        entries = ledger.verified_entries()
        if not run.dp.sample_level:
            assert not site.allow_non_private
            ledger.append(_record(RecordKind.REFUSAL, run_id, server_round, site, data.identity, None, 0))
            continue
        try:
            plan = plan_round(
                run, site, entries, data.identity, run_id, server_round, len(data.train), granted=site.epsilon
            )
        except CohortInputError:
            ledger.append(_record(RecordKind.REFUSAL, run_id, server_round, site, data.identity, None, 0))
            continue
        steps = round_steps(len(data.train), run)
        if refusal_reason(plan, steps, site) is not None:
            ledger.append(_record(RecordKind.REFUSAL, run_id, server_round, site, data.identity, plan.total, 0))
            continue
        ledger.append(
            _record(RecordKind.RELEASE, run_id, server_round, site, data.identity, plan.total.with_steps(steps), steps)
        )


def _record(
    kind: str, run_id: int, server_round: int, site: SiteConfig, identity: str, state: PrivacyState | None, steps: int
) -> LedgerRecord:
    return LedgerRecord(
        kind=kind, run_id=run_id, round=server_round, site=site.name, mechanism=Mechanism.SAMPLE_LEVEL_DP_SGD,
        noise_multiplier=state.noise_multiplier if state else 0.0, sample_rate=state.sample_rate if state else 0.0,
        sampling="poisson", steps=steps, clip_norm=1.0, delta=site.delta,
        epsilon=enforced_epsilon(state, site)[0] if state else 0.0, accountant=site.accountants[0],
        budget_epsilon=site.epsilon, dataset_hash=identity, model_hash="", config_hash="",
    )  # fmt: skip


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=runs, accountants=st.sampled_from(["rdp", "gdp,rdp"]))
def test_no_sequence_of_runs_spends_more_than_the_sites_budget(
    sequence: list[tuple[int, dict]], accountants: str
) -> None:
    with tempfile.TemporaryDirectory() as home:
        images, labels = make_images(120, seed=3)
        np.savez(Path(home) / "data.npz", train_images=images, train_labels=labels[:, None])
        node_config = {
            "data-path": str(Path(home) / "data.npz"),
            "state-dir": str(Path(home) / "state"),
            "epsilon": BUDGET,
            "delta": DELTA,
            "accountants": accountants,
        }
        ledger = SiteLedger(Path(home) / "state", create_key=True)
        for run_id, values in sequence:
            run = SiteRunConfig.from_flower(values)
            _play(ledger, SiteConfig.from_node_config(node_config, run), run_id, run)
        site = SiteConfig.from_node_config(node_config, SiteRunConfig())
        records = [e.record for e in ledger.verified_entries()]
        assert len({r.dataset_hash for r in records}) == 1
        history = history_of(iter_releases(ledger.entries(), records[0].dataset_hash))
        for name in composing_accountants(("rdp", *site.accountants), len(merged_history(history))):
            assert PrivacyState(1.0, 1.0, name, history).epsilon(DELTA) <= BUDGET * 1.0001


# What may happen to a site's state directory between and instead of runs: its operator's
# backups and restores, and what a disk failure or someone at the site (with or without
# the key) can do to it.
STATE_OPERATIONS = (
    "backup", "restore", "truncate", "truncate, head re-signed", "delete ledger and head", "swap key", "wipe",
    "site init", "import", "rotate key",
)  # fmt: skip
histories = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.sampled_from([0.0, 0.8])),
        st.tuples(st.sampled_from(STATE_OPERATIONS), st.integers(1, 3)),
    ),
    min_size=1,
    max_size=12,
)


class _Coordinator:
    """What the coordinator keeps of one site across runs: the newest entry it accepted
    (sent with every instruction) and its run copy of every entry (what an import reads).
    It takes the key a reply presents (binding a name to its key is the coordinator's own
    check, tested with it), so every release counts here, whatever key signed it."""

    def __init__(self, copy: Path) -> None:
        self.copy = copy
        self.newest: LedgerEntry | None = None

    def accept(self, entry: LedgerEntry, key: Ed25519PublicKey) -> None:
        if verify_signature(entry, key) and (self.newest is None or entry.sequence > self.newest.sequence):
            self.newest = entry
            with self.copy.open("a") as stream:
                stream.write(entry.to_json() + "\n")


def _round(
    site: SiteConfig, run: SiteRunConfig, run_id: int, server_round: int, coordinator: _Coordinator
) -> LedgerRecord | None:
    """One round as the site's ClientApp decides it, training replaced by its steps; the
    release made, if any."""
    try:
        ledger = open_site_ledger(site)
        entries = ledger.verified_entries()
        check_not_behind(site, ledger, entries, None if coordinator.newest is None else coordinator.newest.to_json())
    except LedgerBroken:
        return None
    data = local_site_data(str(site.data_path), site.split_seed, site.val_fraction)
    steps = round_steps(len(data.train), run)
    try:
        plan = plan_round(
            run, site, entries, data.identity, run_id, server_round, len(data.train), granted=site.epsilon
        )
    except CohortInputError:
        plan = None
    if plan is None or refusal_reason(plan, steps, site) is not None:
        ledger.append(_record(RecordKind.REFUSAL, run_id, server_round, site, data.identity, None, 0))
        return None
    record = _record(RecordKind.RELEASE, run_id, server_round, site, data.identity, plan.total.with_steps(steps), steps)
    coordinator.accept(ledger.append(record), ledger.public_key)
    return record


def _operate(operation: str, count: int, state: Path, backup: Path, coordinator: _Coordinator) -> None:
    ledger, head = state / LEDGER_FILE, state / HEAD_FILE
    if operation == "backup" and state.exists():
        shutil.rmtree(backup, ignore_errors=True)
        shutil.copytree(state, backup)
    elif operation == "restore" and backup.exists():
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(backup, state)
    elif operation.startswith("truncate") and ledger.exists():
        kept = ledger.read_text().splitlines(keepends=True)[:-count]
        ledger.write_text("".join(kept))
        if operation.endswith("re-signed") and (state / PRIVATE_KEY_FILE).exists():
            key = serialization.load_pem_private_key((state / PRIVATE_KEY_FILE).read_bytes(), password=None)
            last = LedgerEntry.from_json(kept[-1]).entry_hash() if kept else GENESIS_HASH
            write_head(head, sign_head(key, len(kept), last))  # type: ignore[arg-type]
    elif operation == "delete ledger and head":
        ledger.unlink(missing_ok=True)
        head.unlink(missing_ok=True)
    elif operation == "swap key" and state.exists():
        (state / PRIVATE_KEY_FILE).unlink(missing_ok=True)
        SiteLedger(state, create_key=True)
    elif operation == "wipe":
        shutil.rmtree(state, ignore_errors=True)
    elif operation == "site init":
        with contextlib.suppress(CohortInputError):
            init_site_state(state)
    elif operation == "rotate key":
        with contextlib.suppress(CohortInputError):
            rotate_key(state)
    elif operation == "import" and coordinator.copy.exists():
        with contextlib.suppress(CohortInputError):
            import_entries(state, [coordinator.copy])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories)
@example(history=[("run", 0.0), ("restore", 1), ("run", 0.0)])  # the issue's: an older backup restored
@example(history=[("run", 0.0), ("truncate, head re-signed", 3), ("run", 0.0)])
@example(history=[("run", 0.0), ("delete ledger and head", 1), ("site init", 1), ("run", 0.0)])
@example(history=[("run", 0.0), ("wipe", 1), ("site init", 1), ("run", 0.0)])
@example(history=[("run", 0.0), ("swap key", 1), ("delete ledger and head", 1), ("site init", 1), ("run", 0.0)])
@example(history=[("run", 0.8), ("backup", 1), ("run", 0.8), ("restore", 1), ("import", 1), ("run", 0.0)])
@example(history=[("run", 0.8), ("rotate key", 1), ("run", 0.8), ("restore", 1), ("run", 0.0)])
def test_no_backup_restore_truncation_deletion_or_key_swap_lets_a_site_release_more_than_its_budget(
    history: list[tuple[str, object]],
) -> None:
    with tempfile.TemporaryDirectory() as home:
        images, labels = make_images(120, seed=3)
        np.savez(Path(home) / "data.npz", train_images=images, train_labels=labels[:, None])
        state = Path(home) / "state"
        node_config = {
            "data-path": str(Path(home) / "data.npz"),
            "state-dir": str(state),
            "epsilon": BUDGET,
            "delta": DELTA,
            "site-name": "a",
            "ledger-key": init_site_state(state),  # the operator keeps the pin beside the site's budget
        }
        shutil.copytree(state, Path(home) / "backup")  # the operator's first backup, taken at setup
        coordinator = _Coordinator(Path(home) / "run-copy.jsonl")
        released: list[LedgerRecord] = []
        for run_id, (operation, value) in enumerate(history):
            if operation != "run":
                _operate(operation, int(value), state, Path(home) / "backup", coordinator)
                continue
            run = SiteRunConfig.from_flower({"rounds": 3, "batch-size": 20, "noise-multiplier": value})
            site = SiteConfig.from_node_config(node_config, run)
            for server_round in (1, 2, 3):
                record = _round(site, run, run_id, server_round, coordinator)
                released += [] if record is None else [record]
        assert PrivacyState(1.0, 1.0, "rdp", history_of(released)).epsilon(DELTA) <= BUDGET * 1.0001
