"""Three accountants over the same releases, so a wrong epsilon does not go unnoticed.

Opacus' RDP accountant gives the figure that is enforced. Opacus' PRV accountant and
Google's dp-accounting PLD accountant compute the same guarantee more tightly; they are
expected to agree with each other and to come out below RDP (often by tens of percent).
PLD above RDP, or PRV and PLD far apart, means one of them is wrong: a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.accounting import HistoryEntry, merged_history

# How far PLD may sit above RDP (numerical slack), and PRV from PLD, before a warning.
RDP_SLACK = 0.01
PRV_PLD_TOLERANCE = 0.10


@dataclass(frozen=True)
class AccountantComparison:
    """Epsilon of one history under each accountant, at one delta."""

    rdp: float
    prv: float | None
    pld: float | None
    warnings: list[str] = field(default_factory=list)


def compare_accountants(history: tuple[HistoryEntry, ...], delta: float) -> AccountantComparison:
    history = merged_history(history)
    if not history:
        return AccountantComparison(0.0, 0.0, 0.0)
    rdp = RDPAccountant()
    rdp.history = list(history)
    rdp_epsilon = float(rdp.get_epsilon(delta=delta))
    pld_epsilon = pld_epsilon_of(history, delta)
    warnings = []
    try:
        prv_epsilon: float | None = _prv_epsilon(history, delta)
    except (ValueError, RuntimeError, OverflowError) as error:
        prv_epsilon = None
        warnings.append(f"PRV accountant could not compute epsilon ({error})")
    if pld_epsilon > rdp_epsilon * (1 + RDP_SLACK):
        warnings.append(
            f"PLD epsilon {pld_epsilon:.3f} is above RDP epsilon "
            f"{rdp_epsilon:.3f}; RDP is an upper bound, so one of them is wrong"
        )
    if prv_epsilon is not None and abs(prv_epsilon - pld_epsilon) > PRV_PLD_TOLERANCE * pld_epsilon:
        warnings.append(
            f"PRV epsilon {prv_epsilon:.3f} and PLD epsilon "
            f"{pld_epsilon:.3f} differ by more than {PRV_PLD_TOLERANCE:.0%}"
        )
    return AccountantComparison(rdp_epsilon, prv_epsilon, pld_epsilon, warnings)


def _prv_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Opacus' PRV takes log(0) on its grid's edge when q = 1 (a site whose data fits one
    batch); numpy warns, the result is right, and the warning says nothing to a reader."""
    prv = PRVAccountant()
    prv.history = list(history)
    with np.errstate(divide="ignore"):
        return float(prv.get_epsilon(delta=delta))


def pld_epsilon_of(history: tuple[HistoryEntry, ...], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(_dp_event(history))
    return float(accountant.get_epsilon(delta))


# dp-accounting computes integer RDP orders exactly, but its series for fractional orders
# fails to converge for some (sigma, q) and drops them; the cross-check uses integer orders.
INTEGER_ORDERS = tuple(range(2, 64))


def dp_accounting_rdp_epsilon(
    history: tuple[HistoryEntry, ...], delta: float, orders: tuple[float, ...] = INTEGER_ORDERS
) -> float:
    """dp-accounting's own RDP computation: an independent check of the arithmetic behind
    the enforced figure."""
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(orders))
    accountant.compose(_dp_event(history))
    return float(accountant.get_epsilon(delta))


def opacus_rdp_epsilon(
    history: tuple[HistoryEntry, ...], delta: float, orders: tuple[float, ...] = INTEGER_ORDERS
) -> float:
    """Opacus' RDP over a given grid of orders (the enforced figure uses Opacus' finer default grid)."""
    from opacus.accountants.analysis import rdp

    curve = sum(
        rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders)) for sigma, q, steps in history
    )
    return float(rdp.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)[0])


def _dp_event(history: tuple[HistoryEntry, ...]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )
