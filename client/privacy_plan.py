"""How a site decides a round's DP-SGD parameters, and whether the round fits its budget.

The site's own ledger is the source of truth: everything ever released on this dataset,
in any run, composes into what the next round would cost. Every epsilon here is the
site's enforced one: the largest of the accountants its policy names, never the run
config's choice at a deployed site.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from client.policy import SiteConfig
from client.training import steps_per_epoch
from common.config import SiteRunConfig
from common.privacy.accounting import PrivacyState, composing_accountants, derive_noise_multiplier, merged_history
from common.privacy.ledger import LedgerEntry, LedgerRecord, history_of, iter_releases


@dataclass(frozen=True)
class RoundPlan:
    """total: the dataset's whole history, at the sigma and q of this round.
    window: the same, restricted to the releases inside the site's run window (for its cap).
    target: the dataset's epsilon the study may reach: what it had spent before the study
        plus the study's grant, never more than the site's budget.
    """

    total: PrivacyState
    window: PrivacyState
    target: float


def enforced_epsilon(state: PrivacyState, site: SiteConfig) -> tuple[float, str]:
    """The epsilon of `state` under each of the site's accountants that can compose it: the
    largest, and which one."""
    names = composing_accountants(site.accountants, len(merged_history(state.history)))
    return max((dataclasses.replace(state, accountant=name).epsilon(site.delta), name) for name in names)


def noise_for(
    site: SiteConfig, target_epsilon: float, sample_rate: float, steps: int, prior: tuple[tuple[float, float, int], ...]
) -> float:
    """The smallest sigma that keeps every one of the site's accountants that can compose
    the prior releases and a new one within the target."""
    names = composing_accountants(site.accountants, len(merged_history(prior)) + 1)
    return max(
        derive_noise_multiplier(target_epsilon, site.delta, sample_rate, steps, name, prior=prior) for name in names
    )


def round_steps(num_examples: int, run: SiteRunConfig) -> int:
    return run.training.local_epochs * steps_per_epoch(num_examples, run.training.batch_size)


def spent_epsilon(entries: list[LedgerEntry], data_hash: str, site: SiteConfig) -> float:
    history = history_of(iter_releases(entries, data_hash))
    return enforced_epsilon(PrivacyState(1.0, 1.0, site.accountants[0], history), site)[0]


def plan_round(
    run: SiteRunConfig,
    site: SiteConfig,
    entries: list[LedgerEntry],
    data_hash: str,
    run_id: int,
    server_round: int,
    num_examples: int,
    granted: float,
    now: float | None = None,
) -> RoundPlan:
    """sigma is fixed once per run: given by the run config, or derived at the run's first
    round so that what was spent before plus every remaining planned round stays within
    the study's grant (client/study_grant.py; so within the site's budget), and within the
    site's cap over the run window, if it has one.

    Raises CohortInputError when no sigma fits what is left.
    """
    sample_rate = 1.0 / steps_per_epoch(num_examples, run.training.batch_size)
    releases = list(iter_releases(entries, data_hash))
    history = history_of(releases)
    window_history = history_of(_in_window(releases, site, time.time() if now is None else now))
    earlier_in_run = [r for r in releases if r.run_id == run_id]
    before_run = history_of(r for r in releases if r.run_id != run_id)
    target = min(
        site.epsilon, enforced_epsilon(PrivacyState(1.0, 1.0, site.accountants[0], before_run), site)[0] + granted
    )
    if earlier_in_run:
        sigma = earlier_in_run[-1].noise_multiplier
    elif run.dp.noise_multiplier:
        sigma = run.dp.noise_multiplier
    else:
        remaining = (run.training.rounds - server_round + 1) * round_steps(num_examples, run)
        sigma = noise_for(site, target, sample_rate, remaining, prior=history)
        if site.run_epsilon is not None:
            sigma = max(sigma, noise_for(site, site.run_epsilon, sample_rate, remaining, prior=window_history))
    accountant = site.accountants[0]
    return RoundPlan(
        total=PrivacyState(sigma, sample_rate, accountant, history),
        window=PrivacyState(sigma, sample_rate, accountant, window_history),
        target=target,
    )


def refusal_reason(plan: RoundPlan, steps: int, site: SiteConfig) -> str | None:
    """Why the site must not train this round, or None when the round fits its budget."""
    spent, _ = enforced_epsilon(plan.total, site)
    projected, accountant = enforced_epsilon(plan.total.with_steps(steps), site)
    if projected > site.epsilon:
        return (
            f"site {site.name} refuses to train: this round would raise its epsilon from {spent:.3f} "
            f"to {projected:.3f} ({accountant}), over its budget of {site.epsilon:g} (delta {site.delta:g})"
        )
    if projected > plan.target:
        return (
            f"site {site.name} refuses to train: this round would raise its epsilon from {spent:.3f} "
            f"to {projected:.3f} ({accountant}), over the {plan.target:.3f} this study was granted "
            f"(delta {site.delta:g})"
        )
    if plan.total.noise_multiplier > site.max_noise_multiplier:
        return (
            f"site {site.name} refuses to train on noise: the study's plan needs sigma "
            f"{plan.total.noise_multiplier:.2f}, above the site's max-noise-multiplier {site.max_noise_multiplier:g}; "
            "ask for more epsilon, fewer rounds or larger batches"
        )
    window_projected, accountant = enforced_epsilon(plan.window.with_steps(steps), site)
    if site.run_epsilon is not None and window_projected > site.run_epsilon:
        return (
            f"site {site.name} refuses to train: its releases in the last {site.run_window_hours:g} "
            f"hours would reach epsilon {window_projected:.3f} ({accountant}), over the site's "
            f"per-run cap of {site.run_epsilon:g} (delta {site.delta:g})"
        )
    return None


def _in_window(releases: list[LedgerRecord], site: SiteConfig, now: float) -> list[LedgerRecord]:
    start = now - site.run_window_hours * 3600
    return [r for r in releases if r.timestamp >= start]
