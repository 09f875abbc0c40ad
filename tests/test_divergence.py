"""A run that is not learning is named while it runs."""

from __future__ import annotations

import math

from server.records import RoundRecord
from simulations.divergence import divergence


def _rounds(*pairs: tuple[float, float]) -> list[RoundRecord]:
    return [RoundRecord(i, accuracy=accuracy, loss=loss) for i, (accuracy, loss) in enumerate(pairs, start=1)]


def test_a_learning_run_raises_nothing() -> None:
    assert divergence(_rounds((0.3, 2.0), (0.5, 1.5), (0.7, 1.0), (0.8, 0.7), (0.85, 0.5)), num_classes=10) is None


def test_accuracy_at_chance_after_the_grace_rounds_is_named() -> None:
    reason = divergence(_rounds(*[(0.11, 2.3)] * 5), num_classes=10)
    assert reason is not None and "near chance" in reason


def test_accuracy_at_chance_in_the_first_rounds_is_given_time() -> None:
    assert divergence(_rounds(*[(0.11, 2.3)] * 4), num_classes=10) is None


def test_a_non_finite_loss_is_named_at_once() -> None:
    reason = divergence(_rounds((0.1, math.nan)), num_classes=10)
    assert reason is not None and "diverged" in reason


def test_a_loss_rising_well_above_its_start_is_named() -> None:
    reason = divergence(_rounds((0.5, 1.0), (0.5, 1.2), (0.5, 1.4), (0.5, 1.8), (0.5, 2.5)), num_classes=10)
    assert reason is not None and "rose" in reason
