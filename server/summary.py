"""The final figures of a run, written last so its presence means the run finished."""

from __future__ import annotations

import dataclasses

from server.records import RoundRecord, SiteRejections, SiteSummary, Summary


def summarize(
    metrics: list[RoundRecord], wall_seconds: float, stop_reason: str = "", canary_clients: frozenset[str] = frozenset()
) -> Summary:
    """stop_reason: why the run ended before its last round ('' when it did not).
    canary_clients: the audit's canary clients (server.canary_clients), which are no sites:
    they are left out of the sites' figures (their rejections, if any, are kept)."""
    if not metrics:
        return Summary(0, None, None, None, None, {}, (), {}, stop_reason, round(wall_seconds, 2))
    last = metrics[-1]
    sites: dict[str, SiteSummary] = {}
    for record in metrics:
        for name, site in record.sites.items():
            if name in canary_clients:
                continue
            summary = sites.get(name, SiteSummary())
            summary = dataclasses.replace(summary, rounds_trained=summary.rounds_trained + site.trained)
            if site.epsilon is not None:
                summary = dataclasses.replace(summary, epsilon=site.epsilon, delta=site.delta, budget=site.budget)
            if site.val_accuracy is not None:
                summary = dataclasses.replace(summary, val_accuracy=site.val_accuracy)
            sites[name] = summary
    epsilons = [s.epsilon for s in sites.values() if s.epsilon is not None]
    return Summary(
        rounds=last.round,
        final_accuracy=last.accuracy,
        final_loss=last.loss,
        max_epsilon=max(epsilons) if epsilons else None,
        client_level_epsilon=last.client_level.epsilon if last.client_level is not None else None,
        sites=dict(sorted(sites.items())),
        refused=last.refused,
        rejected=rejections(metrics),
        stop_reason=stop_reason,
        wall_seconds=round(wall_seconds, 2),
    )


def rejections(metrics: list[RoundRecord]) -> dict[str, SiteRejections]:
    """Per site: the rounds in which a reply was rejected, and each distinct reason."""
    found: dict[str, SiteRejections] = {}
    for record in metrics:
        for rejection in record.rejected:
            site = found.get(rejection.site, SiteRejections(0, (), ()))
            reasons = site.reasons if rejection.reason in site.reasons else (*site.reasons, rejection.reason)
            found[rejection.site] = SiteRejections(site.count + 1, (*site.rounds, record.round), reasons)
    return dict(sorted(found.items()))
