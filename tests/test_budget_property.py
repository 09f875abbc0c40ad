"""Property: whatever the budget, noise, sampling rate and number of rounds, a site's
ledger never shows more epsilon spent than its budget."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.policy import SiteConfig
from client.privacy_plan import plan_round, refusal_reason, round_steps
from common.config import SiteRunConfig
from common.errors import CohortInputError
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger, iter_releases
from common.privacy.mechanisms import Mechanism


def _spend_like_a_site(ledger: SiteLedger, run: SiteRunConfig, site: SiteConfig, num_examples: int, runs: int) -> None:
    """The client's decision for every round of every run, minus the training itself."""
    for run_id in range(runs):
        for server_round in range(1, run.training.rounds + 1):
            try:
                plan = plan_round(
                    run, site, ledger.entries(), "data", run_id, server_round, num_examples, granted=site.epsilon
                )
            except CohortInputError:  # no sigma fits what is left: the site cannot train at all
                return
            steps = round_steps(num_examples, run)
            reason = refusal_reason(plan, steps, site)
            after = plan.total if reason else plan.total.with_steps(steps)
            ledger.append(
                LedgerRecord(
                    kind=RecordKind.REFUSAL if reason else RecordKind.RELEASE,
                    run_id=run_id,
                    round=server_round,
                    site=site.name,
                    mechanism=Mechanism.SAMPLE_LEVEL_DP_SGD,
                    noise_multiplier=after.noise_multiplier,
                    sample_rate=after.sample_rate,
                    sampling="poisson",
                    steps=0 if reason else steps,
                    clip_norm=1.0,
                    delta=site.delta,
                    epsilon=after.epsilon(site.delta),
                    accountant="rdp",
                    budget_epsilon=site.epsilon,
                    dataset_hash="data",
                    model_hash="",
                    config_hash="",
                    reason=reason or "",
                )
            )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.floats(min_value=0.2, max_value=10.0),
    sigma=st.one_of(st.just(0.0), st.floats(min_value=0.4, max_value=4.0)),
    num_examples=st.integers(min_value=20, max_value=400),
    batch_size=st.integers(min_value=8, max_value=256),
    rounds=st.integers(min_value=1, max_value=6),
    runs=st.integers(min_value=1, max_value=3),
)
def test_no_ledger_ever_shows_more_epsilon_than_the_budget(
    budget: float, sigma: float, num_examples: int, batch_size: int, rounds: int, runs: int
) -> None:
    run = SiteRunConfig.from_flower(
        {"noise-multiplier": sigma, "batch-size": batch_size, "rounds": rounds, "local-epochs": 1}
    )
    with tempfile.TemporaryDirectory() as home:
        site = SiteConfig(name="site", epsilon=budget, delta=1e-5, state_dir=Path(home))
        ledger = SiteLedger(Path(home))
        _spend_like_a_site(ledger, run, site, num_examples, runs)
        releases = list(iter_releases(ledger.entries(), "data"))
        assert all(r.epsilon <= budget for r in releases)
        history = tuple((r.noise_multiplier, r.sample_rate, r.steps) for r in releases)
        assert PrivacyState(1.0, 1.0, "rdp", history).epsilon(1e-5) <= budget
