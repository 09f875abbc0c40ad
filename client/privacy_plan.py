"""How a site decides its DP-SGD parameters for a run and whether a round fits its budget."""

from __future__ import annotations

from common.config import RunConfig
from common.privacy.accounting import PrivacyState, derive_noise_multiplier
from common.site import SiteConfig
from client.training import steps_per_epoch


def round_steps(num_examples: int, run: RunConfig) -> int:
    return run.training.local_epochs * steps_per_epoch(num_examples, run.training.batch_size)


def plan_privacy(run: RunConfig, site: SiteConfig, num_examples: int) -> PrivacyState:
    """A new plan for this run: q from the loader, sigma given or derived once.

    A derived sigma is the smallest that keeps the site within its epsilon after every
    planned round (all rounds, every local epoch), so the target holds at the end even
    if the site trains in every round.
    """
    sample_rate = 1.0 / steps_per_epoch(num_examples, run.training.batch_size)
    sigma = run.dp.noise_multiplier or derive_noise_multiplier(
        target_epsilon=site.epsilon,
        delta=site.delta,
        sample_rate=sample_rate,
        steps=run.training.rounds * round_steps(num_examples, run),
        accountant=run.dp.accountant,
    )
    return PrivacyState(noise_multiplier=sigma, sample_rate=sample_rate, accountant=run.dp.accountant)


def refusal_reason(state: PrivacyState, steps: int, site: SiteConfig) -> str | None:
    """Why the site must not train this round, or None when the round fits its budget."""
    spent = state.epsilon(site.delta)
    projected = state.with_steps(steps).epsilon(site.delta)
    if projected <= site.epsilon:
        return None
    return (
        f"site {site.name} refuses to train: this round would raise its epsilon from {spent:.3f} "
        f"to {projected:.3f}, over its budget of {site.epsilon} (delta {site.delta})"
    )
