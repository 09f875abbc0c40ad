"""A site's sample-level DP-SGD accounting, carried across rounds as plain data.

Opacus' accountants are the only arithmetic here. The state is their `history` of
(noise_multiplier, sample_rate, steps) entries; restoring it into a fresh accountant
each round composes exactly like one accountant that lived through every round, which
is what keeps epsilon from silently restarting at zero (the mistake in Flower's own
Opacus example).

For 'rdp', epsilon is composed as Opacus' RDPAccountant composes it (the sum of each
mechanism's RDP curve from Opacus' compute_rdp, then Opacus' get_privacy_spent), with
each mechanism's curve remembered: a site planning its noise tries a dozen sigmas, each
against the same earlier studies, and at a small sigma one curve costs Opacus tenths of
a second. tests/test_privacy_accounting.py holds the figures equal to RDPAccountant's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.errors import CohortInputError

HistoryEntry = tuple[float, float, int]

# Opacus' accountants that compose a single (sigma, q) only: the GaussianAccountant raises
# when a step changes either, and its get_epsilon reads only the last history entry, so a
# restored history of several would silently count the last mechanism alone.
CONSTANT_NOISE_ACCOUNTANTS = frozenset({"gdp"})


@dataclass(frozen=True)
class PrivacyState:
    """Everything needed to recompute a site's epsilon, in a JSON-safe form.

    noise_multiplier: sigma chosen once for the run (given, or derived from the budget).
    sample_rate: q, the Poisson sampling probability of one example per step.
    accountant: the Opacus mechanism name ('rdp', 'prv' or 'gdp': common.config.ACCOUNTANTS).
    history: (sigma, q, steps) entries in the order they were spent.
    """

    noise_multiplier: float
    sample_rate: float
    accountant: str
    history: tuple[HistoryEntry, ...] = field(default_factory=tuple)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, delta: float) -> float:
        """Raises CohortInputError when the accountant cannot compose this history."""
        if not self.history:
            return 0.0
        history = merged_history(self.history)
        if self.accountant in CONSTANT_NOISE_ACCOUNTANTS and len(history) > 1:
            mechanisms = ", ".join(f"sigma {sigma:.4g} at q {q:.4g}" for sigma, q, _ in history)
            raise CohortInputError(
                f"the {self.accountant} accountant composes one noise multiplier and sample rate only, and this "
                f"dataset would be released at {len(history)} ({mechanisms}); use accountant rdp or prv"
            )
        return _epsilon(self.accountant, history, delta)

    def with_steps(self, steps: int) -> PrivacyState:
        """This state after `steps` more steps at its own sigma and q (not yet taken)."""
        return PrivacyState(
            self.noise_multiplier,
            self.sample_rate,
            self.accountant,
            (*self.history, (self.noise_multiplier, self.sample_rate, steps)),
        )

    def after(self, accountant: IAccountant) -> PrivacyState:
        """This state with the history a round's accountant ended with."""
        return PrivacyState(self.noise_multiplier, self.sample_rate, self.accountant, _history_of(accountant))


def restore_accountant(state: PrivacyState) -> IAccountant:
    """A fresh Opacus accountant that has already composed the state's history."""
    accountant = create_accountant(mechanism=state.accountant)
    accountant.history = list(merged_history(state.history))
    return accountant


@lru_cache(maxsize=4096)
def _epsilon(accountant: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Remembered, because the sites of a simulation compose the same (sigma, q, steps)
    over and over (a thousand IID sites plan the same rounds), and the accountant's
    arithmetic is the costliest part of planning one."""
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    try:
        return float(restore_accountant(PrivacyState(1.0, 1.0, accountant, history)).get_epsilon(delta=delta))
    except ValueError:  # Opacus' gdp solves for epsilon within [0, 500] only
        if accountant in CONSTANT_NOISE_ACCOUNTANTS:
            return float("inf")
        raise


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """RDPAccountant.get_epsilon's arithmetic, step for step, over remembered curves."""
    curve = sum([_rdp_curve(sigma, q) * steps for sigma, q, steps in history])
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
    return float(epsilon)


@lru_cache(maxsize=4096)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """One step's RDP at Opacus' default orders (compute_rdp multiplies it by the steps)."""
    curve = np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )
    curve.flags.writeable = False  # shared by every history that holds this mechanism
    return curve


def composing_accountants(names: tuple[str, ...], mechanisms: int) -> tuple[str, ...]:
    """The accountants among `names` that can compose a history of `mechanisms` distinct
    (sigma, q): a site that enforces gdp beside rdp or prv keeps the others' bound (valid
    for any history) once gdp cannot compose its history. All of `names` when none can,
    so that the first one's error names the problem."""
    able = tuple(name for name in names if name not in CONSTANT_NOISE_ACCOUNTANTS or mechanisms <= 1)
    return able or names


def merged_history(history: tuple[HistoryEntry, ...]) -> tuple[HistoryEntry, ...]:
    """One entry per (sigma, q), steps added up.

    Composition does not depend on order, and k steps of one mechanism compose exactly as
    one entry of k steps, so this changes no epsilon; it keeps the cost of computing one
    constant instead of growing with every round in the ledger.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, count in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + count
    return tuple((sigma, q, count) for (sigma, q), count in steps.items())


def derive_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[HistoryEntry, ...] = (),
) -> float:
    """The smallest sigma (within 1% of epsilon) for which the prior spending plus `steps`
    more steps stays within the target.

    A bisection over sigma in which every epsilon comes from the Opacus accountant; with
    no prior spending it answers what opacus' get_noise_multiplier answers.
    """

    def epsilon_at(sigma: float) -> float:
        return PrivacyState(sigma, sample_rate, accountant, (*prior, (sigma, sample_rate, steps))).epsilon(delta)

    def exhausted() -> CohortInputError:
        return CohortInputError(
            f"no noise level keeps epsilon within {target_epsilon:g} at delta {delta:g} over {steps} more steps "
            f"(already spent: {PrivacyState(1.0, sample_rate, accountant, prior).epsilon(delta):.3f}); "
            "raise the site's epsilon or train fewer rounds"
        )

    return smallest_noise_multiplier(epsilon_at, target_epsilon, exhausted)


def smallest_noise_multiplier(
    epsilon_at: Callable[[float], float], target_epsilon: float, exhausted: Callable[[], CohortInputError]
) -> float:
    """The smallest sigma (within 1% of epsilon) with epsilon_at(sigma) <= target_epsilon:
    doubling from 1 until within, then bisecting. `exhausted` is raised when no sigma up
    to _MAX_NOISE_MULTIPLIER is."""
    low, high = 0.0, 1.0
    while epsilon_at(high) > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_NOISE_MULTIPLIER:
            raise exhausted()
    while target_epsilon - epsilon_at(high) > 0.01 * target_epsilon and high - low > 1e-4:
        middle = (low + high) / 2
        if epsilon_at(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


_MAX_NOISE_MULTIPLIER = 1e4


def _history_of(accountant: IAccountant) -> tuple[HistoryEntry, ...]:
    # Opacus keeps numpy floats in its history; cast so the state round-trips through JSON.
    return tuple((float(s), float(q), int(n)) for s, q, n in accountant.history)
