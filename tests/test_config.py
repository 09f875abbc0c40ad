"""Run and site configuration: one validated object, bad values named with their fix."""

from __future__ import annotations

import dataclasses

import pytest

from client.policy import SiteConfig
from common.config import AUTO_GRAD_SAMPLE_MODE, MODELS, RANGE, flat_settings
from common.errors import CohortInputError
from server.run_config import RunConfig


def test_pyproject_run_config_builds_the_default_run() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    settings = pyproject["tool"]["flwr"]["app"]["config"]
    run = RunConfig.from_flower(settings)
    assert run == RunConfig()
    assert run.to_flower() == {**settings, "batch-size": 256, "learning-rate": 2.0, "grad-sample-mode": "hooks"}


def test_local_training_defaults_follow_dp_so_switching_it_off_still_trains() -> None:
    private, plain = RunConfig.from_flower({}), RunConfig.from_flower({"dp": False})
    assert (private.training.batch_size, private.training.learning_rate) == (256, 2.0)
    assert (plain.training.batch_size, plain.training.learning_rate) == (32, 0.05)


def test_client_level_dp_trains_locally_with_the_non_private_defaults() -> None:
    run = RunConfig.from_flower({"dp-level": "client"})
    assert (run.training.batch_size, run.training.learning_rate) == (32, 0.05)


def test_explicit_batch_size_and_learning_rate_win_over_the_dp_defaults() -> None:
    run = RunConfig.from_flower({"dp": False, "batch-size": 64, "learning-rate": 0.5})
    assert (run.training.batch_size, run.training.learning_rate) == (64, 0.5)


def test_a_resolved_config_round_trips_to_the_same_fingerprint() -> None:
    run = RunConfig.from_flower({"dp": False})
    assert RunConfig.from_flower(run.to_flower()).fingerprint() == run.fingerprint()


@pytest.mark.parametrize(
    "setting,value,message",
    [
        ("model", "resnet", "unknown model 'resnet'"),
        ("strategy", "fedsgd", "unknown strategy 'fedsgd'"),
        ("partitioner", "random", "unknown partitioner 'random'"),
        ("site-epsilon", 0.0, r"site-epsilon is 0.0; it must be a finite number in \(0, 1000\]"),
        ("site-epsilon", -1.0, r"site-epsilon is -1.0; it must be a finite number in \(0, 1000\]"),
        ("site-delta", 0.0, r"site-delta is 0.0; it must be a finite number in \(0, 1\)"),
        ("site-delta", 1.0, r"site-delta is 1.0; it must be a finite number in \(0, 1\)"),
        ("rounds", 0, r"rounds is 0; it must be an integer in \[1, 100000\]"),
        ("clip-norm", 0.0, "clip-norm is 0.0"),
        ("clip-norm", float("inf"), r"clip-norm is inf; it must be a finite number in \(0, 1000\]"),
        ("clip-norm", 1e30, r"clip-norm is 1e\+30; it must be a finite number in \(0, 1000\]"),
        (
            "noise-multiplier",
            float("nan"),
            r"noise-multiplier is nan; it must be a finite number in \[0, 100\] \(0 derives it",
        ),
        ("local-epochs", 100_000, r"local-epochs is 100000; it must be an integer in \[1, 10000\]"),
        ("device", "tpu", "unknown device 'tpu'"),
        ("rounds", "ten", "rounds is 'ten'; it must be a int"),
        ("dp", "yes", "dp is 'yes'; use true or false"),
        ("optimizer", "rmsprop", "unknown optimizer 'rmsprop'"),
        ("grad-sample-mode", "ghost_fsdp", "unknown grad-sample-mode 'ghost_fsdp'"),
    ],
)
def test_bad_setting_is_refused_naming_the_problem(setting: str, value: object, message: str) -> None:
    with pytest.raises(CohortInputError, match=message):
        RunConfig.from_flower({setting: value})


def _numeric_settings() -> list[tuple[str, type]]:
    return [
        (name.replace("_", "-"), kind)
        for name, (_, _, kind) in flat_settings(RunConfig).items()
        if kind in (int, float)
    ]


def test_every_numeric_setting_declares_its_valid_range() -> None:
    sections = [RunConfig(), *(value for value in vars(RunConfig()).values() if dataclasses.is_dataclass(value))]
    declared = {
        item.name.replace("_", "-")
        for section in sections
        for item in dataclasses.fields(section)
        if RANGE in item.metadata
    }
    assert {name for name, _ in _numeric_settings()} <= declared


@pytest.mark.parametrize("name,kind", _numeric_settings())
def test_every_numeric_setting_refuses_values_beyond_any_sound_run(name: str, kind: type) -> None:
    for value in (10**30, -(10**30)) if kind is int else (float("inf"), float("nan"), 1e30, -1e30):
        with pytest.raises(CohortInputError, match=rf"^{name} is .*; it must be (a finite number|an integer) in [\[(]"):
            RunConfig.from_flower({name: value})


def test_unknown_setting_is_refused_naming_the_closest_one() -> None:
    with pytest.raises(CohortInputError, match="unknown setting 'learning-rat'; did you mean 'learning-rate'"):
        RunConfig.from_flower({"learning-rat": 0.1})


def test_integer_values_are_accepted_for_float_settings() -> None:
    assert RunConfig.from_flower({"site-epsilon": 8}).site_epsilon == 8.0


def test_fingerprint_ignores_where_the_run_lives_but_not_what_it_computes() -> None:
    base = RunConfig.from_flower({})
    assert RunConfig.from_flower({"run-dir": "/elsewhere", "run-name": "x"}).fingerprint() == base.fingerprint()
    assert RunConfig.from_flower({"learning-rate": 0.01}).fingerprint() != base.fingerprint()


def test_site_budget_in_node_config_wins_over_the_run_config_default() -> None:
    run = RunConfig.from_flower({"site-epsilon": 8.0})
    site = SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 2, "epsilon": 2.5, "delta": 1e-6}, run)
    assert (site.epsilon, site.delta) == (2.5, 1e-6)


def test_simulated_site_without_its_own_budget_takes_the_run_default() -> None:
    site = SiteConfig.from_node_config({"partition-id": 3, "num-partitions": 5}, RunConfig())
    assert (site.name, site.epsilon, site.delta) == ("site-3", 8.0, 1e-5)


def test_site_with_a_non_positive_budget_is_refused() -> None:
    with pytest.raises(
        CohortInputError, match=r"epsilon in site site's policy is 0.0; it must be a finite number in \(0, 1000\]"
    ):
        SiteConfig.from_node_config(
            {"data-path": "/data", "state-dir": "/nonexistent/site", "epsilon": 0, "delta": 1e-5}, RunConfig()
        )


def test_site_with_an_infinite_budget_is_refused() -> None:
    with pytest.raises(CohortInputError, match="epsilon in site site's policy is inf"):
        SiteConfig.from_node_config(
            {"data-path": "/data", "state-dir": "/nonexistent/site", "epsilon": "inf", "delta": 1e-5}, RunConfig()
        )


def test_deployed_site_without_its_own_budget_is_refused_rather_than_given_the_coordinators() -> None:
    with pytest.raises(CohortInputError, match="chooses its own privacy budget"):
        SiteConfig.from_node_config(
            {"data-path": "/data", "state-dir": "/nonexistent/site", "epsilon": 3}, RunConfig(site_epsilon=50.0)
        )


def test_node_config_without_data_is_refused() -> None:
    with pytest.raises(CohortInputError, match="set data-path"):
        SiteConfig.from_node_config({}, RunConfig())


def test_ghost_clipping_is_refused_for_the_transformer() -> None:
    with pytest.raises(
        CohortInputError, match="ghost clipping fails on the transformer; use auto, hooks, functorch or ew"
    ):
        RunConfig.from_flower({"model": "transformer", "grad-sample-mode": "ghost"})


def test_expanded_weights_are_refused_for_the_weight_standardised_cnn() -> None:
    with pytest.raises(
        CohortInputError,
        match="cannot differentiate the cnn's weight standardisation; use auto, hooks, functorch or ghost",
    ):
        RunConfig.from_flower({"model": "cnn", "grad-sample-mode": "ew"})


@pytest.mark.parametrize("model", MODELS)
def test_auto_grad_sample_mode_becomes_the_fastest_mode_for_the_model(model: str) -> None:
    run = RunConfig.from_flower({"model": model})
    assert run.dp.grad_sample_mode == AUTO_GRAD_SAMPLE_MODE[model] != "auto"
    assert RunConfig.from_flower(run.to_flower()) == run


def test_an_explicit_grad_sample_mode_is_kept() -> None:
    assert RunConfig.from_flower({"grad-sample-mode": "hooks"}).dp.grad_sample_mode == "hooks"
