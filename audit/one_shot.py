"""The one-shot estimate of client-level privacy (Andrew et al., "One-shot Empirical Privacy
Estimation for Federated Learning", ICLR 2024), measured on a finished run with canary
clients (`audit-canary-clients`, server/canary_clients.py).

Canary client i sent, whenever it was sampled, its unit direction c_i clipped to the round's
norm C_t. The final model's change Delta = theta_T - theta_0 then holds C_t c_i / m for each
round it took part in, beside the noise and every other client's update, and the cosine of
c_i with Delta says how much of it shows. A unit direction never inserted has a cosine with
any fixed vector of mean 0 and variance exactly 1/d in d dimensions, and is N(0, 1/d) to
within what matters for d >= 1000 (every Cohort model has more than 6,000 parameters). The
estimate fits a Gaussian N(mu, s^2) to the inserted canaries' cosines and reports the epsilon,
at the run's client delta, with which N(0, 1/d) and N(mu, s^2) are (epsilon, delta)-
indistinguishable (audit.two_gaussians): the privacy the final model shows for one client.

"All iterates", the paper's observer who sees every round's model: each canary's statistic
is its largest cosine with one round's change theta_t - theta_{t-1}, and its null the same
statistic of HELD_OUT directions never inserted (drawn like the canaries', after them),
each side fitted by a Gaussian.

What it is: an estimate under the paper's assumptions (canary clients are treated as any
client, the cosines are Gaussian), with no confidence guarantee. It is not a lower bound,
and with a hundred canaries it runs high: the epsilon of two Gaussians of unequal spread
grows fast with the ratio of their spreads, so the fitted spread's sampling error (about
1/sqrt(2K)) alone lifts it, by about 1 at a true 3.7 with K = 100 (docs/benchmarks.md). The
paper's FL experiments used a thousand canaries. So the comparison with the accountant is
made on a figure that allows for it (epsilon_low_end): the paper's Gaussian-mechanism model
gives inserted and null cosines the same spread (a canary's own share of the model's change
is all that differs, 1/K of the canaries' share), so it keeps the spread at the null's and
takes the canaries' mean cosine at its one-sided 95% low end. A canary's direction is
random, not the worst case, so either figure can also sit well below what a run leaks.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from audit.empirical import initial_model, saved_result
from audit.spending import audit
from audit.two_gaussians import Gaussian, epsilon_between
from common.errors import CohortInputError
from common.secure_aggregation.model_vector import update_vector
from server.canary_clients import canary_client_name, canary_direction
from server.checkpoint import Checkpoint
from server.held_out import federated_split
from server.records import RoundRecord
from server.run_config import MIN_CANARY_CLIENTS, RunConfig
from server.rundir import RunDirectory

ONE_SHOT_FILE = "one_shot_estimate.json"
HELD_OUT = 1000
# The one-sided 95% low end of a fitted mean: mean - 1.645 standard errors.
_LOW_END_Z = 1.6449
# A canary's update arrives at the round's clip norm (client-side clipping, float32) or far
# above it (server-side): below it by more than this, clipping did not set its size.
_CLIPPED_TOLERANCE = 1e-3
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OneShotEstimate:
    """One estimate's figures, as one_shot_estimate.json, audit.json and the terminal report them.

    canary_clients: K; inserted: those with an update in a released round (only they are
    fitted); dimension: d; rounds: the released rounds; delta: the run's client delta.
    final_mean, final_std: the Gaussian fitted to the inserted canaries' cosines with the
    final model's change; epsilon_final: against N(0, 1/d).
    iterates_mean, iterates_std: fitted to their largest cosine with one round's change;
    null_mean, null_std: fitted to that of the held_out directions never inserted;
    epsilon_all_iterates: between the two.
    epsilon_low_end: the final model's, with the spread kept at the null's and the mean
    cosine at its one-sided 95% low end; what is compared with the accountant.
    accountant_epsilon: the server ledger's client-level epsilon for the run.
    unclipped: canary updates that arrived below their round's clip norm (then the
    clipping did not set their size, and the estimate's premise fails).
    """

    canary_clients: int
    inserted: int
    dimension: int
    rounds: int
    delta: float
    final_mean: float
    final_std: float
    epsilon_final: float
    iterates_mean: float
    iterates_std: float
    held_out: int
    null_mean: float
    null_std: float
    epsilon_all_iterates: float
    epsilon_low_end: float
    accountant_epsilon: float
    unclipped: int
    seconds: float

    @property
    def above_accountant(self) -> bool:
        """Even allowing for the fit's sampling error, the final model shows more than the server claims."""
        return self.epsilon_low_end > self.accountant_epsilon

    @property
    def scope(self) -> tuple[str, str]:
        """What the estimate is, and what it is not."""
        what = (
            "is: an estimate of the client-level epsilon one client's update shows (Andrew et al., ICLR 2024), "
            "under the paper's assumptions: canary clients are treated as any client, their cosines are Gaussian, "
            f"and a direction never inserted has cosine N(0, 1/d), d = {self.dimension}"
        )
        not_ = (
            "is not: a lower bound with a confidence guarantee (another seed or canary count moves it, and with "
            f"{self.inserted} canaries the fitted spread alone lifts it), nor proof that the run is private (random "
            "directions are not the worst case a real client can be)"
        )
        return what, not_

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "above_accountant": self.above_accountant, "scope": list(self.scope)}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> OneShotEstimate:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def estimate_run(run_dir: Path) -> OneShotEstimate:
    """The one-shot estimate of a finished run with canary clients."""
    started = time.monotonic()
    directory = RunDirectory(run_dir)
    run = directory.read_config()
    k = run.data.audit_canary_clients
    if k == 0:
        raise CohortInputError(
            f"{run_dir} was run without canary clients; run it again with --set audit-canary-clients=100 "
            '(dp-level = "client")'
        )
    accountant = _accountant_epsilon(run_dir)
    metrics = directory.read_metrics()
    inserted = _inserted(metrics, k)
    if len(inserted) < MIN_CANARY_CLIENTS:
        raise CohortInputError(
            f"only {len(inserted)} canary client(s) of {k} took part in a released round of {run_dir}; the estimate "
            f"needs {MIN_CANARY_CLIENTS}: run more rounds, a larger fraction-train or more canary clients"
        )
    models = _global_models(run, directory)
    change = _unit(update_vector(ArrayRecord(models[-1]), ArrayRecord(models[0])))
    steps = [update_vector(ArrayRecord(after), ArrayRecord(before)) for before, after in itertools.pairwise(models)]
    rounds = np.stack([_unit(step) for step in steps if np.any(step)])
    final, iterates = _cosines(run.data.seed, inserted, change, rounds)
    null = _cosines(run.data.seed, range(k, k + HELD_OUT), change, rounds)[1]
    fitted_final, fitted_iterates, fitted_null = fit(final), fit(iterates), fit(null)
    delta = run.central_dp.client_delta
    return OneShotEstimate(
        canary_clients=k,
        inserted=len(inserted),
        dimension=len(change),
        rounds=len(rounds),
        delta=delta,
        final_mean=fitted_final.mean,
        final_std=fitted_final.std,
        epsilon_final=final_model_epsilon(fitted_final, len(change), delta),
        iterates_mean=fitted_iterates.mean,
        iterates_std=fitted_iterates.std,
        held_out=HELD_OUT,
        null_mean=fitted_null.mean,
        null_std=fitted_null.std,
        epsilon_all_iterates=epsilon_between(fitted_null, fitted_iterates, delta),
        epsilon_low_end=low_end_epsilon(fitted_final, len(final), len(change), delta),
        accountant_epsilon=accountant,
        unclipped=_unclipped(metrics, k),
        seconds=round(time.monotonic() - started, 2),
    )


def _cosines(
    seed: int, indices: Iterable[int], change: np.ndarray, rounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each direction's cosine with the final model's change (a unit vector), and its
    largest with one round's (the rows of `rounds`, unit vectors)."""
    final, iterates = [], []
    for index in indices:
        direction = canary_direction(seed, index, len(change))
        final.append(direction @ change)
        iterates.append(np.max(rounds @ direction))
    return np.array(final), np.array(iterates)


def _accountant_epsilon(run_dir: Path) -> float:
    """The server ledger's client-level epsilon for the run, recomputed from the ledger."""
    server = audit(run_dir, "server")["sites"].get("server")
    if server is None:
        raise CohortInputError(f"the server of {run_dir} released no round: there is nothing to estimate")
    return float(server["epsilon_this_run"])


def _inserted(metrics: list[RoundRecord], k: int) -> list[int]:
    """The canary clients with an accepted update in a released round."""
    released = [r for r in metrics if r.client_level is not None and r.client_level.released]
    return [
        i
        for i in range(k)
        if any(canary_client_name(i) in r.sites and r.sites[canary_client_name(i)].trained for r in released)
    ]


def _unclipped(metrics: list[RoundRecord], k: int) -> int:
    """Canary updates of released rounds that arrived below the round's clip norm."""
    names = {canary_client_name(i) for i in range(k)}
    return sum(
        1
        for r in metrics
        if r.client_level is not None and r.client_level.released and r.client_level.clip_norm is not None
        for name, site in r.sites.items()
        if name in names
        and site.trained
        and site.update_norm is not None
        and site.update_norm < r.client_level.clip_norm * (1 - _CLIPPED_TOLERANCE)
    )


def _global_models(run: RunConfig, directory: RunDirectory) -> list[StateDict]:
    """The initial global model, then the one after each round (its checkpoint), in order."""
    split = federated_split(run.data)
    checkpoints = sorted(directory.checkpoint_dir.glob("round-*.pt"))
    if not checkpoints:
        raise CohortInputError(f"{directory.path} holds no checkpoint: the run released no round")
    initial = initial_model(run, split.input_shape, split.num_classes)
    return [initial, *(Checkpoint.load(path).weights for path in checkpoints)]


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    if norm == 0:
        raise CohortInputError("the final model is the initial one: no round changed it, there is nothing to estimate")
    return vector / norm


def fit(values: np.ndarray) -> Gaussian:
    return Gaussian(float(np.mean(values)), float(np.std(values, ddof=1)))


def final_model_epsilon(fitted: Gaussian, dimension: int, delta: float) -> float:
    """The paper's estimate: the fitted cosines against N(0, 1/d)."""
    return epsilon_between(Gaussian(0.0, dimension**-0.5), fitted, delta)


def low_end_epsilon(fitted: Gaussian, canaries: int, dimension: int, delta: float) -> float:
    """The final model's estimate with the spread kept at the null's, 1/sqrt(d), and the
    mean cosine of `canaries` at its one-sided 95% low end (0 at most)."""
    null = Gaussian(0.0, dimension**-0.5)
    low_end = max(0.0, fitted.mean - _LOW_END_Z * fitted.std / math.sqrt(canaries))
    return epsilon_between(null, Gaussian(low_end, null.std), delta)


def verdict(estimate: OneShotEstimate) -> str:
    """One line beside the server ledger's epsilon."""
    figures = (
        f"estimated epsilon {estimate.epsilon_final:.3f} (final model), "
        f"{estimate.epsilon_all_iterates:.3f} (all iterates), {estimate.epsilon_low_end:.3f} (low end)"
    )
    claim = f"the server ledger's client-level epsilon {estimate.accountant_epsilon:.3f}"
    if estimate.above_accountant:
        return (
            f"ABOVE THE ACCOUNTANT: {figures}; even the low end exceeds {claim}: a sign of a DP bug (noise, "
            "clipping or accounting) under the paper's assumptions, not proof"
        )
    return f"{figures}; {claim}"


def saved_estimate(run_dir: Path) -> OneShotEstimate | None:
    """The last one-shot estimate of this run directory, if any."""
    return saved_result(run_dir, ONE_SHOT_FILE, OneShotEstimate.from_json)
