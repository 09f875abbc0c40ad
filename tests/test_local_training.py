"""A site's local round: DP-SGD that composes across rounds and leaves nothing behind."""

from __future__ import annotations

import pytest
import torch

from client.privacy_plan import plan_privacy, refusal_reason, round_steps
from client.training import train_locally
from common.config import DataConfig, RunConfig
from common.data.federation import simulated_site_data
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.site import SiteConfig

RUN = RunConfig.from_flower({"rounds": 3, "local-epochs": 1})
SITE = SiteConfig(name="site-0", epsilon=8.0, delta=1e-5, partition_id=0, num_partitions=5)
DATA = simulated_site_data(DataConfig(), 0, 5)


def _model() -> torch.nn.Module:
    return build_model("cnn", DATA.train.input_shape, DATA.num_classes)


def test_rounds_on_the_same_module_leave_no_opacus_hooks_behind() -> None:
    model = _model()
    privacy = plan_privacy(RUN, SITE, len(DATA.train))
    for _ in range(2):
        privacy = train_locally(model, DATA.train, RUN, privacy, torch.device("cpu")).privacy
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_each_round_adds_its_steps_to_the_carried_history() -> None:
    privacy = plan_privacy(RUN, SITE, len(DATA.train))
    first = train_locally(_model(), DATA.train, RUN, privacy, torch.device("cpu"))
    second = train_locally(_model(), DATA.train, RUN, first.privacy, torch.device("cpu"))
    assert first.steps == round_steps(len(DATA.train), RUN)
    assert second.privacy.steps == 2 * first.steps
    assert second.privacy.epsilon(SITE.delta) > first.privacy.epsilon(SITE.delta)


def test_derived_plan_spends_at_most_the_budget_over_all_planned_rounds() -> None:
    plan = plan_privacy(RUN, SITE, len(DATA.train))
    after_all_rounds = plan.with_steps(RUN.training.rounds * round_steps(len(DATA.train), RUN))
    assert after_all_rounds.epsilon(SITE.delta) <= SITE.epsilon


def test_a_round_that_would_exceed_the_budget_is_refused() -> None:
    plan = plan_privacy(RUN, SITE, len(DATA.train))
    spent = plan.with_steps(RUN.training.rounds * round_steps(len(DATA.train), RUN))
    reason = refusal_reason(spent, round_steps(len(DATA.train), RUN), SITE)
    assert reason is not None and "over its budget of 8.0" in reason


def test_a_round_within_the_budget_is_not_refused() -> None:
    plan = plan_privacy(RUN, SITE, len(DATA.train))
    assert refusal_reason(plan, round_steps(len(DATA.train), RUN), SITE) is None


def test_non_private_training_reports_no_privacy_state() -> None:
    run = RunConfig.from_flower({"dp": False})
    update = train_locally(_model(), DATA.train, run, None, torch.device("cpu"))
    assert update.privacy is None and update.num_examples == len(DATA.train)


def test_fedprox_pull_keeps_weights_closer_to_the_global_model() -> None:
    run = RunConfig.from_flower({"dp": False, "local-epochs": 3})
    start = _model()
    anchor = torch.cat([p.detach().flatten() for p in start.parameters()])

    def distance(mu: float) -> float:
        model = _model()
        model.load_state_dict(start.state_dict())
        torch.manual_seed(0)
        train_locally(model, DATA.train, run, None, torch.device("cpu"), proximal_mu=mu)
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - anchor).norm())

    assert distance(0.5) < distance(0.0)


def test_cosine_schedule_decays_from_the_full_rate_to_a_tenth() -> None:
    from client.training import round_learning_rate
    from common.config import TrainingConfig

    training = TrainingConfig(learning_rate=2.0, rounds=11, lr_schedule="cosine")
    rates = [round_learning_rate(training, r) for r in range(1, 12)]
    assert rates[0] == pytest.approx(2.0) and rates[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_constant_schedule_keeps_the_rate() -> None:
    from client.training import round_learning_rate
    from common.config import TrainingConfig

    training = TrainingConfig(learning_rate=0.3, rounds=5, lr_schedule="constant")
    assert {round_learning_rate(training, r) for r in range(1, 6)} == {0.3}
