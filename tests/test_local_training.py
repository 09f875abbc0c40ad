"""A site's local round: DP-SGD that composes across rounds and leaves nothing behind."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.policy import SiteConfig
from client.privacy_plan import RoundPlan, plan_round, refusal_reason, round_steps
from client.training import noise_only_step, round_learning_rate, train_locally
from common.config import GRAD_SAMPLE_MODES, SiteRunConfig, TrainingConfig
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.noise import SeededNoise
from server.run_config import DataConfig
from simulations.federation import simulated_site_data

RUN = SiteRunConfig.from_flower({"rounds": 3, "local-epochs": 1, "batch-size": 64})
SITE = SiteConfig(name="site-0", epsilon=8.0, delta=1e-5, state_dir=Path("/unused"), partition_id=0, num_partitions=5)
DATA = simulated_site_data(DataConfig(), 0, 5)
STEPS = round_steps(len(DATA.train), RUN)


def _noise(server_round: int = 1) -> SeededNoise:
    return SeededNoise(42, SITE.name, server_round)


def _model() -> torch.nn.Module:
    return build_model("cnn", DATA.train.input_shape, DATA.num_classes)


def _fresh_plan(site: SiteConfig = SITE) -> RoundPlan:
    return plan_round(
        RUN,
        site,
        entries=[],
        data_hash="d",
        run_id=1,
        server_round=1,
        num_examples=len(DATA.train),
        granted=site.epsilon,
    )


def test_rounds_on_the_same_module_leave_no_opacus_hooks_behind() -> None:
    model = _model()
    privacy = _fresh_plan().total
    for _ in range(2):
        privacy = train_locally(model, DATA.train, RUN, privacy, torch.device("cpu"), _noise()).privacy
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())


def test_dp_training_does_not_warn_about_the_first_layers_backward_hook(recwarn: pytest.WarningsRecorder) -> None:
    train_locally(_model(), DATA.train, RUN, _fresh_plan().total, torch.device("cpu"), _noise())
    assert not [w for w in recwarn if "Full backward hook" in str(w.message)]


def test_each_round_adds_its_steps_to_the_carried_history() -> None:
    first = train_locally(_model(), DATA.train, RUN, _fresh_plan().total, torch.device("cpu"), _noise(1))
    second = train_locally(_model(), DATA.train, RUN, first.privacy, torch.device("cpu"), _noise(2))
    assert first.steps == STEPS
    assert second.privacy.steps == 2 * first.steps
    assert second.privacy.epsilon(SITE.delta) > first.privacy.epsilon(SITE.delta)


def test_derived_plan_spends_at_most_the_budget_over_all_planned_rounds() -> None:
    after_all_rounds = _fresh_plan().total.with_steps(RUN.training.rounds * STEPS)
    assert after_all_rounds.epsilon(SITE.delta) <= SITE.epsilon


def test_a_round_that_would_exceed_the_budget_is_refused() -> None:
    plan = _fresh_plan()
    spent = RoundPlan(plan.total.with_steps(RUN.training.rounds * STEPS), plan.window, plan.target)
    reason = refusal_reason(spent, STEPS, SITE)
    assert reason is not None and "over its budget of 8" in reason


def test_a_round_within_the_budget_is_not_refused() -> None:
    assert refusal_reason(_fresh_plan(), STEPS, SITE) is None


def test_a_per_run_cap_lowers_the_run_plan_and_refuses_beyond_it() -> None:
    capped = SiteConfig(
        name="site-0",
        epsilon=8.0,
        delta=1e-5,
        state_dir=Path("/unused"),
        run_epsilon=2.0,
        partition_id=0,
        num_partitions=5,
    )
    plan = _fresh_plan(capped)
    assert plan.window.with_steps(RUN.training.rounds * STEPS).epsilon(1e-5) <= 2.0
    over = RoundPlan(plan.total, plan.window.with_steps(RUN.training.rounds * STEPS), plan.target)
    assert "per-run cap of 2" in refusal_reason(over, STEPS, capped)


def test_non_private_training_reports_no_privacy_state() -> None:
    run = SiteRunConfig.from_flower({"dp": False})
    update = train_locally(_model(), DATA.train, run, None, torch.device("cpu"), _noise())
    assert update.privacy is None and update.num_examples == len(DATA.train)


def test_fedprox_pull_keeps_weights_closer_to_the_global_model() -> None:
    run = SiteRunConfig.from_flower({"dp": False, "local-epochs": 3, "batch-size": 32, "learning-rate": 0.05})
    start = _model()
    anchor = torch.cat([p.detach().flatten() for p in start.parameters()])

    def distance(mu: float) -> float:
        model = _model()
        model.load_state_dict(start.state_dict())
        train_locally(model, DATA.train, run, None, torch.device("cpu"), _noise(), proximal_mu=mu)
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - anchor).norm())

    assert distance(0.5) < distance(0.0)


def test_cosine_schedule_decays_from_the_full_rate_to_a_tenth() -> None:
    training = TrainingConfig(learning_rate=2.0, rounds=11, lr_schedule="cosine")
    rates = [round_learning_rate(training, r) for r in range(1, 12)]
    assert rates[0] == pytest.approx(2.0) and rates[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_constant_schedule_keeps_the_rate() -> None:
    training = TrainingConfig(learning_rate=0.3, rounds=5, lr_schedule="constant")
    assert {round_learning_rate(training, r) for r in range(1, 6)} == {0.3}


def _dp_step_on_an_empty_batch(mode: str, through_the_model: bool) -> tuple[torch.Tensor, list]:
    """The weights after one Poisson step on an empty batch, and the accountant's history."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10)
    criterion = torch.nn.CrossEntropyLoss()
    engine = PrivacyEngine(accountant="rdp")
    private = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9),
        criterion=criterion,
        data_loader=DataLoader(TensorDataset(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=0.5,
        poisson_sampling=True,
        grad_sample_mode=mode,
    )
    wrapped, optimizer = private[0], private[1]
    loss_fn = private[2] if mode == "ghost" else criterion
    torch.manual_seed(1)
    optimizer.zero_grad()
    if through_the_model:
        loss_fn(wrapped(torch.zeros(0, 1, 8, 8)), torch.zeros(0, dtype=torch.long)).backward()
        optimizer.step()
    else:
        noise_only_step(optimizer)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), engine.accountant.history


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_batch_takes_exactly_opacus_own_noisy_step_in_every_mode(mode: str) -> None:
    weights, history = _dp_step_on_an_empty_batch(mode, through_the_model=False)
    opacus_weights, opacus_history = _dp_step_on_an_empty_batch("hooks", through_the_model=True)
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in build_model("cnn", (1, 8, 8), 10).parameters()])
    assert torch.equal(weights, opacus_weights) and not torch.equal(weights, initial)
    assert history == opacus_history == [(1.0, 0.5, 1)]


def test_a_round_with_empty_poisson_batches_takes_and_accounts_every_step() -> None:
    # q = 1/8 over 8 examples: about a third of the 24 batches are empty.
    run = SiteRunConfig.from_flower({"rounds": 1, "local-epochs": 3, "batch-size": 1})
    few = DATA.train.subset(np.arange(8))
    update = train_locally(_model(), few, run, PrivacyState(1.0, 1 / 8, "rdp"), torch.device("cpu"), _noise())
    assert update.steps == 24 and update.privacy.history == ((1.0, 1 / 8, 24),)
