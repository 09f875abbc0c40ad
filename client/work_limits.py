"""How much work one round may ask of a site: its policy's max-round-steps and
max-round-seconds (client.policy), whatever the run config says.

A coordinator sets local-epochs, and with it the steps of every round, and nothing but the
site bounds them: local-epochs = 100000 would keep a hospital's machine busy for days. The
steps a round asks are known before it starts, so a round beyond max-round-steps is
refused before any training; its wall time is known only as it runs, so a round still
training at max-round-seconds is stopped and nothing of it is released (an update that is
never sent spends no privacy).
"""

from __future__ import annotations

from client.policy import SiteConfig
from client.privacy_plan import round_steps
from common.config import SiteRunConfig


def steps_refusal(site: SiteConfig, run: SiteRunConfig, num_examples: int) -> str | None:
    """Why the site refuses a round that asks more steps than its policy allows, or None."""
    steps = round_steps(num_examples, run)
    if steps <= site.max_round_steps:
        return None
    return (
        f"site {site.name} refuses to train: this round asks {steps} local steps (local-epochs "
        f"{run.training.local_epochs} over {num_examples} examples at batch size {run.training.batch_size}), "
        f"over its policy's max-round-steps of {site.max_round_steps}; a site that agrees raises max-round-steps"
    )


def overtime_refusal(site: SiteConfig, steps_taken: int, steps: int) -> str:
    """Why the site released nothing of a round it stopped at its wall-time limit."""
    return (
        f"site {site.name} stopped training after {steps_taken} of {steps} steps "
        "and released nothing: the round ran over its policy's max-round-seconds "
        f"of {site.max_round_seconds:g}; a site that agrees raises max-round-seconds"
    )
