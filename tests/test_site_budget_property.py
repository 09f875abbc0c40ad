"""Property: whatever runs a coordinator starts against one deployed site, with whatever
run configs and run ids, the site's ledger never shows more than the site's budget, under
any accountant the site enforces, and all of it is spent on one dataset identity."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.policy import SiteConfig
from client.privacy_plan import enforced_epsilon, plan_round, refusal_reason, round_steps
from client.site_data import local_site_data
from common.config import SiteRunConfig
from common.errors import CohortInputError
from common.privacy.accounting import PrivacyState, accountant_names
from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger, history_of, iter_releases
from common.privacy.mechanisms import Mechanism
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
        "accountant": st.sampled_from(accountant_names()),
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
            plan = plan_round(run, site, entries, data.identity, run_id, server_round, len(data.train))
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
        releases = list(iter_releases(ledger.entries(), records[0].dataset_hash))
        for name in ("rdp", *site.accountants):
            assert PrivacyState(1.0, 1.0, name, history_of(releases)).epsilon(DELTA) <= BUDGET * 1.0001
