"""The final figures of a run, written last so its presence means the run finished."""

from __future__ import annotations

from typing import Any


def summarize(metrics: list[dict[str, Any]], wall_seconds: float, stop_reason: str = "") -> dict[str, Any]:
    """stop_reason: why the run ended before its last round ('' when it did not).

    rejected: per site, how many of its replies the server's checks rejected and why.
    max_epsilon is the largest site's sample-level epsilon; client_level_epsilon the
    server's, for runs with client-level DP (None otherwise).
    """
    if not metrics:
        return {"rounds": 0, "final_accuracy": None, "final_loss": None, "max_epsilon": None, "client_level_epsilon": None, "sites": {}, "refused": [], "rejected": {}, "stop_reason": stop_reason, "wall_seconds": round(wall_seconds, 2)}
    last = metrics[-1]
    sites: dict[str, dict[str, Any]] = {}
    for record in metrics:
        for name, site in record["sites"].items():
            summary = sites.setdefault(name, {"epsilon": None, "budget": None, "rounds_trained": 0})
            summary["rounds_trained"] += bool(site.get("trained"))
            if site.get("epsilon") is not None:
                summary["epsilon"] = site["epsilon"]
                summary["delta"] = site["delta"]
                summary["budget"] = site["budget"]
            if site.get("val_accuracy") is not None:
                summary["val_accuracy"] = site["val_accuracy"]
    epsilons = [s["epsilon"] for s in sites.values() if s["epsilon"] is not None]
    return {
        "rounds": last["round"],
        "final_accuracy": last["global"]["accuracy"],
        "final_loss": last["global"]["loss"],
        "max_epsilon": max(epsilons) if epsilons else None,
        "client_level_epsilon": last["client_level"]["epsilon"] if "client_level" in last else None,
        "sites": dict(sorted(sites.items())),
        "refused": last.get("refused", []),
        "rejected": rejections(metrics),
        "stop_reason": stop_reason,
        "wall_seconds": round(wall_seconds, 2),
    }


def rejections(metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site: the rounds in which a reply was rejected, and each distinct reason."""
    found: dict[str, dict[str, Any]] = {}
    for record in metrics:
        for rejection in record.get("rejected", []):
            site = found.setdefault(rejection["site"], {"count": 0, "rounds": [], "reasons": []})
            site["count"] += 1
            site["rounds"].append(record["round"])
            if rejection["reason"] not in site["reasons"]:
                site["reasons"].append(rejection["reason"])
    return dict(sorted(found.items()))
