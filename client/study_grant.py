"""How much of a site's budget a study gets: the study asks (the run config's StudyRequest),
the site grants at most what it has left and its own per-study cap, or refuses.

The grant is decided from the site's ledger alone, before the site reads its data: what
the site has spent is the largest epsilon any of its datasets has spent, in runs other
than this one (a site that changed its data grants no more than its most spent dataset
has left). It excludes this run's own releases, so every round of a study reaches the
same grant: the coordinator's ask before round 1 and each training round alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from client.policy import SiteConfig
from client.privacy_plan import spent_epsilon
from common.config import StudyRequest
from common.privacy.ledger import LedgerEntry, RecordKind


@dataclass(frozen=True)
class Grant:
    """epsilon: what the study may spend at this site over all its rounds."""

    epsilon: float


def spent_before(entries: list[LedgerEntry], run_id: int, site: SiteConfig) -> float:
    """The most any of the site's datasets had spent before this run."""
    earlier = [e for e in entries if e.record.run_id != run_id]
    datasets = {e.record.dataset_hash for e in earlier if e.record.kind == RecordKind.RELEASE}
    return max((spent_epsilon(earlier, dataset, site) for dataset in datasets), default=0.0)


def grant(study: StudyRequest, site: SiteConfig, entries: list[LedgerEntry], run_id: int) -> Grant | str:
    """The site's grant to this study, or the one-line reason it refuses the study."""
    if study.study_delta and site.delta > study.study_delta:
        return (
            f"site {site.name} refuses the study: it asks delta {study.study_delta:g}, the site's policy accounts "
            f"at delta {site.delta:g}; ask for delta {site.delta:g} or more"
        )
    left = max(site.epsilon - spent_before(entries, run_id, site), 0.0)
    most = min(left, site.study_epsilon)
    if study.study_epsilon and study.study_epsilon <= most:
        return Grant(study.study_epsilon)
    if not study.study_epsilon and most > 0:
        return Grant(most)
    asked = f"epsilon {study.study_epsilon:g}" if study.study_epsilon else "its budget"
    return (
        f"site {site.name} refuses the study: it asks {asked}; the site grants at most {most:.3f} "
        f"(left {left:.3f} of {site.epsilon:g}, per-study cap {site.study_epsilon:g})"
    )
