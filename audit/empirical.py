"""`cohort audit empirical`: an epsilon lower bound measured on a finished run.

Each canary is scored on what the run's observer saw (audit.canary_scores: by default the
canary site's update of every round, and gradient-space canaries); the auditor guesses
"trained on" for the highest scores and "not" for the lowest, and turns the number of
right guesses into a lower bound with the test in `audit.one_run`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from audit.canary_scores import DESCRIPTIONS, dirac_scores, input_final_scores, input_transcript_scores
from audit.one_run import CONFIDENCE, Guesses, epsilon_lower_bound, require_power
from audit.spending import audit
from common.errors import CohortInputError
from common.models.registry import build_model
from server.audit_transcript import canary_site, read_transcript
from server.held_out import federated_split, gradient_canaries
from server.run_config import RunConfig
from server.rundir import RunDirectory

EMPIRICAL_AUDIT_FILE = "empirical_audit.json"
# observer -> (what it sees, who sees that)
VIEWS = {
    "transcript": ("the canary site's update of every round", "what the coordinator sees"),
    "final-model": ("the final global model alone", "what anyone given the model sees"),
}
KINDS = {"dirac": "gradient-space (Dirac) canaries", "input": "input-space canaries (wrong-labelled images)"}


@dataclass(frozen=True)
class EmpiricalAudit:
    """One audit's figures, as audit.json and the terminal report them.

    site: the simulated site that held the canaries; canaries (m), guesses (r) and
    correct (v) as in the paper; epsilon_lower_bound: at `confidence`, for `delta`;
    accountant_epsilon: what the site's ledger says it spent in this run (None: it
    trained without DP, so no finite epsilon is claimed); contradicts_accountant: the
    bound exceeds the claim, which only a bug in the DP implementation can cause.
    observer and canary_kind: what produced the scores (audit.canary_scores), score says
    it in words; ceiling: the bound had every guess been right, the most this m and r can
    ever show.
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
    observer: str
    canary_kind: str
    score: str
    ceiling: float
    seconds: float

    @property
    def contradicts_accountant(self) -> bool:
        return self.accountant_epsilon is not None and self.epsilon_lower_bound > self.accountant_epsilon

    @property
    def source(self) -> str:
        """Which canaries, scored on what, produced the bound."""
        view, who = VIEWS[self.observer]
        return f"{KINDS[self.canary_kind]} scored on {view} ({who})"

    @property
    def scope(self) -> tuple[str, str]:
        """What the bound can show, and what it cannot."""
        can = (
            f"can show: {self.site} leaks at least this epsilon about one of its examples to whoever sees "
            f"{VIEWS[self.observer][0]}; above the accountant's epsilon it proves a bug in the DP "
            "implementation (noise, sampling, clipping or accounting)"
        )
        cannot = (
            "cannot show: that the run is private (a lower bound only: a stronger attack may find more), nor any "
            f"epsilon above {self.ceiling:.2f}, the most {self.canaries} canaries and {self.guesses} guesses can show"
        )
        if self.canary_kind == "dirac":
            cannot += (
                "; a gradient canary's gradient is set, not computed by the model, so a bug in per-sample "
                "gradients escapes it"
            )
        return can, cannot

    def to_json(self) -> dict[str, object]:
        return {
            **asdict(self),
            "contradicts_accountant": self.contradicts_accountant,
            "source": self.source,
            "scope": list(self.scope),
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> EmpiricalAudit:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def audit_run(run_dir: Path, guesses: int | None = None) -> EmpiricalAudit:
    """Score the run's canaries on its observer's view; guesses: r (default m / 4)."""
    started = time.monotonic()
    directory = RunDirectory(run_dir)
    run = directory.read_config()
    m = run.data.audit_canaries
    if m == 0:
        raise CohortInputError(
            f"{run_dir} was run without canaries; run it again with --set audit-canaries=200 (mnist-5k: up to 500), "
            'or at dp-level = "client" with --set audit-canary-clients=100'
        )
    site = canary_site(run.data)
    spent = audit(run_dir, site)["sites"].get(site)
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
    scores, included = _scores(run, directory)
    correct = _correct_guesses(scores, included, r // 2)
    private = spent["releases"] > 0 and spent["non_private_rounds"] == 0
    return EmpiricalAudit(
        site=site,
        canaries=m,
        included=int(included.sum()),
        guesses=r,
        correct=correct,
        delta=spent["delta"],
        confidence=CONFIDENCE,
        epsilon_lower_bound=epsilon_lower_bound(Guesses(m, r, correct), spent["delta"]),
        accountant_epsilon=spent["epsilon_this_run"] if private else None,
        observer=run.data.audit_observer,
        canary_kind=run.data.audit_canary_kind,
        score=DESCRIPTIONS[(run.data.audit_canary_kind, run.data.audit_observer)],
        ceiling=epsilon_lower_bound(Guesses(m, r, r), spent["delta"]),
        seconds=round(time.monotonic() - started, 2),
    )


def _scores(run: RunConfig, directory: RunDirectory) -> tuple[np.ndarray, np.ndarray]:
    """Each canary's score on the run's observer, and whether the canary site trained on it."""
    split = federated_split(run.data)
    model = directory.final_model(run, split.input_shape, split.num_classes)
    transcript = read_transcript(directory.path) if run.data.audit_observer == "transcript" else []
    if run.data.audit_observer == "transcript" and not transcript:
        raise CohortInputError(
            f"{directory.path} holds no audit transcript (the canary site never sent an accepted update); "
            'audit its final model instead: run it again with --set audit-observer="final-model"'
        )
    gradient = gradient_canaries(run)
    if gradient is not None:
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        observed = transcript or [(initial_model(run, split.input_shape, split.num_classes), model.state_dict())]
        return dirac_scores(observed, names, gradient.coordinates), gradient.included
    assert split.canaries is not None
    if transcript:
        return input_transcript_scores(transcript, model, split.canaries.examples), split.canaries.included
    return input_final_scores(model, split.canaries.examples), split.canaries.included


def initial_model(run: RunConfig, input_shape: tuple[int, int, int], num_classes: int) -> dict[str, torch.Tensor]:
    """The global model round 1 started from, made as the ServerApp makes it."""
    torch.manual_seed(run.data.seed)
    return build_model(run.training.model, input_shape, num_classes).state_dict()


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
    """The last one-run audit of this run directory, if any."""
    return saved_result(run_dir, EMPIRICAL_AUDIT_FILE, EmpiricalAudit.from_json)


Result = TypeVar("Result")


def saved_result(run_dir: Path, name: str, parse: Callable[[dict[str, Any]], Result]) -> Result | None:
    """What the last `cohort audit empirical` of this run directory saved as `name`, if any."""
    file = run_dir / name
    if not file.is_file():
        return None
    try:
        return parse(json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CohortInputError(
            f"{file} is unreadable ({error}); run `cohort audit empirical {run_dir}` again"
        ) from None
