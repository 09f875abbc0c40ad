"""`cohort audit empirical`: an epsilon lower bound measured on a finished run.

The attack is black-box and is what anyone holding the final global model can do:
score each canary by its loss under that model (memorised wrong labels have a low
loss), guess "trained on" for the lowest losses and "not" for the highest, and turn the
number of right guesses into a lower bound with the test in `audit.one_run`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audit.one_run import CONFIDENCE, Guesses, epsilon_lower_bound, require_power
from audit.spending import audit
from common.errors import CohortInputError
from common.evaluation import predict
from server.held_out import federated_split
from server.rundir import RunDirectory

EMPIRICAL_AUDIT_FILE = "empirical_audit.json"
SCORE = "loss of each canary (with its wrong label) under the final global model"


@dataclass(frozen=True)
class EmpiricalAudit:
    """One audit's figures, as audit.json and the terminal report them.

    site: the simulated site that held the canaries; canaries (m), guesses (r) and
    correct (v) as in the paper; epsilon_lower_bound: at `confidence`, for `delta`;
    accountant_epsilon: what the site's ledger says it spent in this run (None: it
    trained without DP, so no finite epsilon is claimed); contradicts_accountant: the
    bound exceeds the claim, which only a bug in the DP implementation can cause.
    """

    site: str
    canaries: int
    included: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    accountant_epsilon: float | None
    score: str
    seconds: float

    @property
    def contradicts_accountant(self) -> bool:
        return self.accountant_epsilon is not None and self.epsilon_lower_bound > self.accountant_epsilon

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "contradicts_accountant": self.contradicts_accountant}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> EmpiricalAudit:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def audit_run(run_dir: Path, guesses: int | None = None) -> EmpiricalAudit:
    """Score the run's canaries under its final model; guesses: r (default m / 4)."""
    started = time.monotonic()
    directory = RunDirectory(run_dir)
    run = directory.read_config()
    m = run.data.audit_canaries
    if m == 0:
        raise CohortInputError(
            f"{run_dir} was run without canaries; run it again with --set audit-canaries=200 (mnist-5k: up to 500)"
        )
    site = f"site-{run.data.audit_canary_site}"
    spent = audit(run_dir)["sites"].get(site)
    if spent is None:
        raise CohortInputError(
            f"{site} (audit-canary-site) never trained in {run_dir}; choose a site of the federation"
        )
    r = guesses if guesses is not None else max(2, m // 8 * 2)
    if not 2 <= r <= m or r % 2:
        raise CohortInputError(
            f"--guesses is {r}; it must be even and between 2 and the {m} canaries (half 'in', half 'out')"
        )
    require_power(m, r, spent["delta"])
    split = federated_split(run.data)
    assert split.canaries is not None
    model = directory.final_model(run, split.input_shape, split.num_classes)
    losses = predict(model, split.canaries.examples, torch.device("cpu")).losses
    correct = _correct_guesses(-losses, split.canaries.included, r // 2)
    private = spent["releases"] > 0 and spent["non_private_rounds"] == 0
    return EmpiricalAudit(
        site=site,
        canaries=m,
        included=int(split.canaries.included.sum()),
        guesses=r,
        correct=correct,
        delta=spent["delta"],
        confidence=CONFIDENCE,
        epsilon_lower_bound=epsilon_lower_bound(Guesses(m, r, correct), spent["delta"]),
        accountant_epsilon=spent["epsilon_this_run"] if private else None,
        score=SCORE,
        seconds=round(time.monotonic() - started, 2),
    )


def _correct_guesses(scores: np.ndarray, included: np.ndarray, per_side: int) -> int:
    """Guess 'in' for the per_side highest scores and 'out' for the per_side lowest."""
    order = np.argsort(-scores, kind="stable")
    return int(included[order[:per_side]].sum() + (~included[order[-per_side:]]).sum())


def verdict(result: EmpiricalAudit) -> str:
    """One line a privacy officer can act on."""
    bound = f"epsilon >= {result.epsilon_lower_bound:.3f} ({result.confidence:.0%} confidence)"
    if result.accountant_epsilon is None:
        return f"no DP at {result.site}: {bound}, the audit's power"
    claim = f"accountant's {result.accountant_epsilon:.3f}"
    if result.contradicts_accountant:
        return f"PRIVACY BUG at {result.site}: {bound} exceeds the {claim}"
    if math.isclose(result.epsilon_lower_bound, 0.0):
        return f"{result.site}: no leakage found, {bound}; {claim}"
    return f"{result.site}: {bound}, within the {claim}"


def saved_audit(run_dir: Path) -> EmpiricalAudit | None:
    """The last `cohort audit empirical` of this run directory, if any."""
    file = run_dir / EMPIRICAL_AUDIT_FILE
    if not file.is_file():
        return None
    try:
        return EmpiricalAudit.from_json(json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CohortInputError(
            f"{file} is unreadable ({error}); run `cohort audit empirical {run_dir}` again"
        ) from None
