"""The privacy ledger format: one record per DP release (a site's training round)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE_LEVEL_DP_SGD = "sample-level-dp-sgd"


@dataclass(frozen=True)
class LedgerRecord:
    """What one site released in one round, enough to recompute its epsilon.

    run_id: the Flower run that asked for the release.
    round: the federated round.
    site: the site that trained.
    mechanism: how noise was added (sample-level DP-SGD here).
    noise_multiplier: sigma, noise std in units of clip_norm.
    sample_rate: q, Poisson sampling probability of one example per step.
    sampling: the sampling scheme that q refers to.
    steps: noisy gradient steps taken in this round.
    clip_norm: C, per-example gradient norm bound.
    delta: the delta at which epsilon is stated.
    epsilon: the site's cumulative epsilon after this round.
    accountant: the accountant that computed epsilon.
    """

    run_id: int
    round: int
    site: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    sampling: str
    steps: int
    clip_norm: float
    delta: float
    epsilon: float
    accountant: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def read_ledger(path: Path) -> list[LedgerRecord]:
    with path.open(encoding="utf-8") as stream:
        return [LedgerRecord(**json.loads(line)) for line in stream if line.strip()]
