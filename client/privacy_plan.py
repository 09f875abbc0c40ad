"""How a site decides a round's DP-SGD parameters, and whether the round fits its budget.

The site's own ledger is the source of truth: everything ever released on this dataset,
in any run, composes into what the next round would cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from client.training import steps_per_epoch
from common.config import RunConfig
from common.data.dataset import LabeledImages
from common.privacy.accounting import PrivacyState, derive_noise_multiplier
from common.privacy.ledger import LedgerEntry, history_of, iter_releases, sha256_hex
from common.site import SiteConfig


@dataclass(frozen=True)
class RoundPlan:
    """total: the dataset's whole history, at the sigma and q of this round.
    this_run: the same, restricted to this run's releases (for a per-run cap).
    """

    total: PrivacyState
    this_run: PrivacyState


def dataset_hash(data: LabeledImages) -> str:
    return sha256_hex(data.images.tobytes(), data.labels.tobytes())


def round_steps(num_examples: int, run: RunConfig) -> int:
    return run.training.local_epochs * steps_per_epoch(num_examples, run.training.batch_size)


def spent_epsilon(entries: list[LedgerEntry], data_hash: str, delta: float, accountant: str) -> float:
    history = history_of(iter_releases(entries, data_hash))
    return PrivacyState(1.0, 1.0, accountant, history).epsilon(delta)


def plan_round(run: RunConfig, site: SiteConfig, entries: list[LedgerEntry], data_hash: str, run_id: int, server_round: int, num_examples: int) -> RoundPlan:
    """sigma is fixed once per run: given by the run config, or derived at the run's first
    round so that what was spent before plus every remaining planned round stays within
    the site's budget (and within its per-run cap, if it has one)."""
    sample_rate = 1.0 / steps_per_epoch(num_examples, run.training.batch_size)
    releases = list(iter_releases(entries, data_hash))
    history = history_of(releases)
    earlier_in_run = [r for r in releases if r.run_id == run_id]
    run_history = history_of(earlier_in_run)
    if earlier_in_run:
        sigma = earlier_in_run[-1].noise_multiplier
    elif run.dp.noise_multiplier:
        sigma = run.dp.noise_multiplier
    else:
        remaining = (run.training.rounds - server_round + 1) * round_steps(num_examples, run)
        sigma = derive_noise_multiplier(site.epsilon, site.delta, sample_rate, remaining, run.dp.accountant, prior=history)
        if site.run_epsilon is not None:
            sigma = max(sigma, derive_noise_multiplier(site.run_epsilon, site.delta, sample_rate, remaining, run.dp.accountant))
    return RoundPlan(
        total=PrivacyState(sigma, sample_rate, run.dp.accountant, history),
        this_run=PrivacyState(sigma, sample_rate, run.dp.accountant, run_history),
    )


def refusal_reason(plan: RoundPlan, steps: int, site: SiteConfig) -> str | None:
    """Why the site must not train this round, or None when the round fits its budget."""
    spent = plan.total.epsilon(site.delta)
    projected = plan.total.with_steps(steps).epsilon(site.delta)
    if projected > site.epsilon:
        return (
            f"site {site.name} refuses to train: this round would raise its epsilon from {spent:.3f} "
            f"to {projected:.3f}, over its budget of {site.epsilon:g} (delta {site.delta:g})"
        )
    run_projected = plan.this_run.with_steps(steps).epsilon(site.delta)
    if site.run_epsilon is not None and run_projected > site.run_epsilon:
        return (
            f"site {site.name} refuses to train: this run would reach epsilon {run_projected:.3f}, "
            f"over the site's per-run cap of {site.run_epsilon:g} (delta {site.delta:g})"
        )
    return None
