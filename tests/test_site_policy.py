"""A deployed site's policy comes from the site alone, and its budget belongs to its data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from client.policy import ACCOUNTING_METRICS, DEFAULT_MAX_ROUND_STEPS, SiteConfig
from client.privacy_plan import enforced_epsilon, plan_round, refusal_reason, round_steps
from client.site_data import local_site_data
from client.study_grant import Grant, grant
from common import protocol
from common.config import SiteRunConfig, StudyRequest, TrainingConfig
from common.errors import CohortInputError
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import LedgerRecord, RecordKind, SiteLedger
from common.privacy.mechanisms import Mechanism
from deploy.launch import init_site_state

HOSTILE_RUN = SiteRunConfig.from_flower(
    {
        "site-allow-non-private": True,
        "site-epsilon": 100.0,
        "accountant": "gdp",
        "federation-home": "/tmp/elsewhere",
        "dp": False,
    }
)


def _deployed(state_dir: Path, **policy: object) -> SiteConfig:
    return SiteConfig.from_node_config(
        {"data-path": "/data", "state-dir": str(state_dir), "epsilon": 2.0, "delta": 1e-5, **policy}, HOSTILE_RUN
    )


def test_a_deployed_site_takes_nothing_from_the_run_config(tmp_path: Path) -> None:
    site = _deployed(tmp_path / "state")
    assert site.state_dir == (tmp_path / "state").resolve()
    assert (site.epsilon, site.allow_non_private, site.accountants) == (2.0, False, ("rdp",))


def test_a_deployed_site_without_a_state_dir_is_refused() -> None:
    with pytest.raises(CohortInputError, match="sets no state-dir"):
        SiteConfig.from_node_config({"data-path": "/data", "epsilon": 2.0, "delta": 1e-5}, HOSTILE_RUN)


def test_a_deployed_site_reads_its_policy_file_and_its_node_config_wins(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "policy.toml").write_text(
        'allow-non-private = true\naccountants = ["rdp", "prv"]\nepsilon = 5.0\nsend-metrics = []\n'
    )
    site = _deployed(state)
    assert (site.epsilon, site.allow_non_private, site.accountants, site.send_metrics) == (
        2.0,
        True,
        ("rdp", "prv"),
        (),
    )


def test_by_default_a_deployed_site_sends_accounting_figures_only_and_answers_no_evaluation(tmp_path: Path) -> None:
    site = _deployed(tmp_path)
    assert site.send_metrics == ACCOUNTING_METRICS and not site.answer_evaluation


def test_a_simulated_site_keeps_the_run_configs_defaults_and_reports_everything() -> None:
    site = SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 2}, HOSTILE_RUN)
    assert (site.epsilon, site.allow_non_private, site.accountants) == (100.0, True, ("gdp",))
    assert "train-loss" in site.send_metrics and site.answer_evaluation


def test_an_unknown_metric_or_accountant_in_the_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CohortInputError, match="send-metrics names raw-gradients"):
        _deployed(tmp_path, **{"send-metrics": "epsilon,raw-gradients"})
    with pytest.raises(CohortInputError, match="accountants names moments"):
        _deployed(tmp_path, accountants="moments")


def test_the_most_conservative_of_the_sites_accountants_is_enforced(tmp_path: Path) -> None:
    state = PrivacyState(1.0, 0.05, "rdp", ((1.0, 0.05, 400),))
    each = {name: enforced_epsilon(state, _deployed(tmp_path, accountants=name))[0] for name in ("rdp", "prv", "gdp")}
    both = enforced_epsilon(state, _deployed(tmp_path, accountants="gdp,rdp,prv"))
    assert both == (max(each.values()), max(each, key=each.get))


def test_the_data_identity_is_the_same_for_any_seed_and_validation_share(site_npz: Path) -> None:
    identities = {local_site_data(str(site_npz), seed, share).identity for seed in (0, 43) for share in (0.1, 0.3)}
    assert len(identities) == 1


def test_a_sites_split_is_its_own_and_stable(site_npz: Path) -> None:
    first, again = (local_site_data(str(site_npz), seed=7, val_fraction=0.2) for _ in range(2))
    assert np.array_equal(first.train.labels, again.train.labels) and len(first.val) == 20


def _release(run_id: int, plan_state: PrivacyState, steps: int, timestamp: float) -> LedgerRecord:
    after = plan_state.with_steps(steps)
    return LedgerRecord(
        kind=RecordKind.RELEASE, run_id=run_id, round=1, site="site", mechanism=Mechanism.SAMPLE_LEVEL_DP_SGD,
        noise_multiplier=after.noise_multiplier, sample_rate=after.sample_rate, sampling="poisson", steps=steps,
        clip_norm=1.0, delta=1e-5, epsilon=0.0, accountant="rdp", budget_epsilon=8.0, dataset_hash="data",
        model_hash="", config_hash="", timestamp=timestamp,
    )  # fmt: skip


def test_the_per_run_cap_holds_across_new_run_ids_within_the_window(tmp_path: Path) -> None:
    site = _deployed(tmp_path, epsilon=8.0, **{"run-epsilon": 1.0, "run-window-hours": 24})
    ledger = SiteLedger(tmp_path)
    run = SiteRunConfig.from_flower({"rounds": 1, "batch-size": 20})
    now = 1_000_000.0
    plan = plan_round(
        run, site, ledger.entries(), "data", run_id=1, server_round=1, num_examples=100, granted=site.epsilon, now=now
    )
    steps = round_steps(100, run)
    assert refusal_reason(plan, steps, site) is None
    ledger.append(_release(1, plan.total, steps, now))
    noisy = SiteRunConfig.from_flower({"rounds": 1, "batch-size": 20, "noise-multiplier": 3.0})
    fresh_run = plan_round(
        noisy,
        site,
        ledger.entries(),
        "data",
        run_id=2,
        server_round=1,
        num_examples=100,
        granted=site.epsilon,
        now=now + 60,
    )
    reason = refusal_reason(fresh_run, steps, site)
    assert reason is not None and "per-run cap of 1" in reason
    next_day = plan_round(
        noisy,
        site,
        ledger.entries(),
        "data",
        run_id=3,
        server_round=1,
        num_examples=100,
        granted=site.epsilon,
        now=now + 25 * 3600,
    )
    assert refusal_reason(next_day, steps, site) is None


def test_a_site_whose_policy_forbids_a_run_without_dp_refuses_before_reading_any_data(
    tmp_path: Path, clientapp_identity: None
) -> None:
    from client.app import app

    init_site_state(tmp_path / "state")
    node_config = {
        "data-path": str(tmp_path / "not-read.npz"),
        "state-dir": str(tmp_path / "state"),
        "epsilon": 2.0,
        "delta": 1e-5,
        "site-name": "a",
    }
    instruction = Message(
        content=RecordDict({protocol.ARRAYS: ArrayRecord(), protocol.CONFIG: ConfigRecord({protocol.CONFIG_ROUND: 1})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = app(
        instruction, Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={"dp": False})
    )
    assert reply.has_error() and reply.error.code == protocol.SITE_REFUSED
    assert "refuses to train without differential privacy" in reply.error.reason
    (refusal,) = SiteLedger(tmp_path / "state").verified_entries()
    assert (refusal.record.kind, refusal.record.dataset_hash) == ("refusal", "")


def test_a_deployed_sites_default_per_study_cap_is_a_quarter_of_its_budget(tmp_path: Path) -> None:
    assert (
        _deployed(tmp_path).study_epsilon == 0.5 and _deployed(tmp_path, **{"study-epsilon": 2.0}).study_epsilon == 2.0
    )


def test_a_per_study_cap_above_the_budget_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(
        CohortInputError,
        match=re.escape("study-epsilon is 3.0 in site site's policy; a per-study cap must be > 0 and at most epsilon"),
    ):
        _deployed(tmp_path, **{"study-epsilon": 3.0})


def _study(epsilon: float, delta: float = 0.0) -> StudyRequest:
    return SiteRunConfig.from_flower({"study-epsilon": epsilon, "study-delta": delta}).study


def test_a_site_grants_what_a_study_asks_within_its_cap_and_all_it_may_to_a_study_asking_for_its_budget(
    tmp_path: Path,
) -> None:
    site = _deployed(tmp_path, epsilon=8.0)
    assert grant(_study(1.5), site, [], run_id=1) == Grant(1.5)
    assert grant(_study(0.0), site, [], run_id=1) == Grant(2.0)


def test_a_site_refuses_a_study_asking_more_than_it_grants_with_the_figures(tmp_path: Path) -> None:
    reason = grant(_study(5.0), _deployed(tmp_path, epsilon=8.0), [], run_id=1)
    assert (
        reason == "site site refuses the study: it asks epsilon 5; the site grants at most 2.000 "
        "(left 8.000 of 8, per-study cap 2)"
    )


def test_a_site_refuses_a_study_that_needs_a_smaller_delta_than_it_accounts_at(tmp_path: Path) -> None:
    reason = grant(_study(0.5, delta=1e-7), _deployed(tmp_path), [], run_id=1)
    assert isinstance(reason, str) and "ask for delta 1e-05 or more" in reason


def _study_ask() -> Message:
    """The coordinator's ask before round 1 (server/study_ask.py)."""
    return Message(
        content=RecordDict({protocol.CONFIG: ConfigRecord({protocol.CONFIG_ROUND: 0})}),
        dst_node_id=1,
        message_type="query",
    )


def _asked_site(tmp_path: Path, epsilon: object) -> dict[str, object]:
    """A deployed site's node config whose data file does not exist: the ask must not read it."""
    return {
        "data-path": str(tmp_path / "not-read.npz"),
        "state-dir": str(tmp_path / "state"),
        "epsilon": epsilon,
        "delta": 1e-5,
        "site-name": "a",
    }


def test_a_site_answers_the_coordinators_ask_from_its_ledger_before_reading_any_data(
    tmp_path: Path, clientapp_identity: None
) -> None:
    from client.app import app

    init_site_state(tmp_path / "state")
    node_config = _asked_site(tmp_path, epsilon=4.0)
    ask = _study_ask()
    granted = app(
        ask,
        Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={"study-epsilon": 1.0}),
    )
    assert granted.content[protocol.METRICS][protocol.STUDY_EPSILON] == 1.0
    refused = app(
        ask,
        Context(run_id=8, node_id=1, node_config=node_config, state=RecordDict(), run_config={"study-epsilon": 5.0}),
    )
    assert (
        refused.has_error()
        and refused.error.code == protocol.SITE_REFUSED
        and "it asks epsilon 5" in refused.error.reason
    )
    (refusal,) = SiteLedger(tmp_path / "state").verified_entries()
    assert (refusal.record.kind, refusal.record.run_id, refusal.record.dataset_hash) == ("refusal", 8, "")


def test_a_site_whose_answer_to_the_ask_fails_replies_with_one_line_of_its_own(
    tmp_path: Path, clientapp_identity: None
) -> None:
    from client.app import app

    node_config = _asked_site(tmp_path, epsilon="lots")
    ask = _study_ask()
    reply = app(
        ask,
        Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={"study-epsilon": 1.0}),
    )
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "CohortInputError: epsilon is 'lots' in the site's policy; it must be a number"


def test_a_site_refuses_a_plan_whose_noise_leaves_no_signal_naming_the_fix(tmp_path: Path) -> None:
    site = _deployed(tmp_path, epsilon=8.0)
    run = SiteRunConfig.from_flower({"rounds": 1, "batch-size": 20, "noise-multiplier": site.max_noise_multiplier * 2})
    plan = plan_round(run, site, [], "data", run_id=1, server_round=1, num_examples=100, granted=site.epsilon)
    reason = refusal_reason(plan, round_steps(100, run), site)
    assert (
        reason is not None
        and "refuses to train on noise" in reason
        and reason.endswith("ask for more epsilon, fewer rounds or larger batches")
    )


def _round_one(model_shape: tuple[int, int, int] = (1, 8, 8), classes: int = 3) -> Message:
    arrays = ArrayRecord(build_model(TrainingConfig().model, model_shape, classes).state_dict())
    return Message(
        content=RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord({protocol.CONFIG_ROUND: 1})}),
        dst_node_id=1,
        message_type="train",
    )


def _site_answers(data: Path, state: Path, run_config: dict[str, object], run_id: int = 7, **policy: object) -> Message:
    """The site's own ClientApp, as its runner calls it, on its data and state directory;
    its per-study cap is its whole budget, so that a study may spend what the round plans."""
    from client.app import app

    node_config = {
        "data-path": str(data),
        "state-dir": str(state),
        "epsilon": 8.0,
        "delta": 1e-5,
        "study-epsilon": 8.0,
        "site-name": "a",
        **policy,
    }
    small = {"rounds": 1, "batch-size": 20, "noise-multiplier": 1.0, **run_config}
    return app(
        _round_one(), Context(run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=small)
    )


def test_a_gdp_site_refuses_a_round_at_another_sigma_than_its_ledger_holds(
    site_npz: Path, tmp_path: Path, clientapp_identity: None
) -> None:
    state = tmp_path / "state"
    init_site_state(state)
    assert not _site_answers(site_npz, state, {}, run_id=1, accountants="rdp").has_error()
    reply = _site_answers(site_npz, state, {"noise-multiplier": 2.0}, run_id=2, accountants="gdp")
    assert reply.has_error() and reply.error.code == protocol.SITE_REFUSED
    assert reply.error.reason.startswith(
        "site a refuses to train: the gdp accountant composes one noise multiplier and sample rate only"
    )
    assert len(reply.error.reason.splitlines()) == 1
    assert [e.record.kind for e in SiteLedger(state).verified_entries()] == [RecordKind.RELEASE, RecordKind.REFUSAL]


def test_the_gdp_accountant_never_composes_two_noise_levels_silently() -> None:
    with pytest.raises(CohortInputError, match=r"would be released at 2 \(sigma 1 at q 0.2, sigma 2 at q 0.2\)"):
        PrivacyState(2.0, 0.2, "gdp", ((1.0, 0.2, 5), (2.0, 0.2, 5))).epsilon(1e-5)


def test_a_sites_failure_reaches_the_coordinator_as_one_line_without_its_paths(
    tmp_path: Path, clientapp_identity: None
) -> None:
    wrong_shape = tmp_path / "hospital-a.npz"
    np.savez(wrong_shape, train_images=np.zeros(10, np.uint8), train_labels=np.zeros(10, np.int64))
    init_site_state(tmp_path / "state")
    reply = _site_answers(wrong_shape, tmp_path / "state", {})
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("CohortInputError: <local path>")
    assert str(tmp_path) not in reply.error.reason and "hospital-a" not in reply.error.reason
    assert len(reply.error.reason.splitlines()) == 1


def test_a_round_asking_more_steps_than_the_policy_allows_is_refused_before_training(
    site_npz: Path, tmp_path: Path, clientapp_identity: None
) -> None:
    init_site_state(tmp_path / "state")
    reply = _site_answers(site_npz, tmp_path / "state", {"local-epochs": 10_000})
    assert reply.has_error() and reply.error.code == protocol.SITE_REFUSED
    assert (
        f"over its policy's max-round-steps of {DEFAULT_MAX_ROUND_STEPS}; a site that agrees raises max-round-steps"
        in reply.error.reason
    )
    assert [e.record.kind for e in SiteLedger(tmp_path / "state").verified_entries()] == [RecordKind.REFUSAL]


def test_a_round_over_the_policys_wall_time_is_stopped_and_releases_nothing(
    site_npz: Path, tmp_path: Path, clientapp_identity: None
) -> None:
    init_site_state(tmp_path / "state")
    reply = _site_answers(site_npz, tmp_path / "state", {"local-epochs": 3}, **{"max-round-seconds": 1e-6})
    assert reply.has_error() and reply.error.code == protocol.SITE_REFUSED
    assert (
        "stopped training after 1 of 15 steps and released nothing" in reply.error.reason
        and "max-round-seconds of 1e-06" in reply.error.reason
    )
    assert [e.record.kind for e in SiteLedger(tmp_path / "state").verified_entries()] == [RecordKind.REFUSAL]


@pytest.mark.parametrize(
    "key,value",
    [
        ("max-round-steps", 0),
        ("max-round-seconds", "inf"),
        ("run-epsilon", "nan"),
        ("run-window-hours", -1),
        ("study-epsilon", 0),
        ("max-noise-multiplier", "inf"),
    ],
)
def test_a_policy_number_out_of_its_range_is_refused_naming_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(CohortInputError, match=f"^{key} in the site's policy is .*; it must be a finite number in"):
        _deployed(tmp_path, **{key: value})
