"""The ClientApp: one site's local DP-SGD training and local validation.

At a deployed site this is the site's own installed code (client/site_runner.py runs it
whatever FAB the coordinator submitted), and everything it decides comes from the site's
policy (client/policy.py), never from the run config.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.clipping import central_dp_clipping_mod
from client.dp_randomness import site_noise_source
from client.evaluation_policy import declined_evaluation
from client.gradient_canaries import GradientCanaries
from client.integer_update import SECURE_AGGREGATION_STREAM, integer_update
from client.ledger_guard import LedgerBehind, check_not_behind, newest_entry, open_site_ledger
from client.policy import AGGREGATION_METRICS, SiteConfig
from client.privacy_plan import enforced_epsilon, plan_round, refusal_reason, round_steps, spent_epsilon
from client.secure_aggregation import Masker, is_secure_aggregation, key_stage_reply, masked_input_reply
from client.site_data import SiteData, local_site_data, simulated_site_data
from client.site_failure import one_line_on_failure
from client.study_grant import Grant, grant
from client.training import RoundOverTime, train_locally
from client.work_limits import overtime_refusal, steps_refusal
from common import protocol
from common.config import SiteRunConfig
from common.errors import CohortInputError
from common.evaluation import evaluate, resolve_device
from common.flower_logs import readable_flower_logs
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import (
    LedgerBroken,
    LedgerEntry,
    LedgerRecord,
    Noise,
    Sampling,
    SiteLedger,
    Spender,
    Study,
    model_hash,
)
from common.secure_aggregation import messages as secure_messages
from common.secure_aggregation.messages import masked_input_record
from common.secure_aggregation.model_vector import update_vector

readable_flower_logs()
app = ClientApp()


def _received_model(msg: Message, run: SiteRunConfig, data: SiteData) -> torch.nn.Module:
    model = build_model(run.training.model, data.train.input_shape, data.num_classes)
    model.load_state_dict(msg.content.array_records[protocol.ARRAYS].to_torch_state_dict())
    return model


@app.train(mods=[central_dp_clipping_mod])
@one_line_on_failure
def train(msg: Message, context: Context) -> Message:
    """Train. Under secure aggregation a train message is one of its stages: the key stages
    are answered without training, the masked-input stage trains and masks."""
    run = SiteRunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    secure = is_secure_aggregation(msg)
    key_stage = key_stage_reply(msg, context, site.name) if secure else None
    if key_stage is not None:
        return key_stage
    if secure != run.dp.secure_aggregation:  # the run config the site signs says how its update leaves it
        said = "with" if run.dp.secure_aggregation else "without"
        return Message(
            Error(
                code=secure_messages.REFUSED,
                reason=f"site {site.name} refuses: the run says {said} secure aggregation, the request does not",
            ),
            reply_to=msg,
        )
    if secure:
        return masked_input_reply(msg, context, site.name, lambda masker: _train(msg, context, run, site, masker))
    return _train(msg, context, run, site, None)


def _verified_ledger(msg: Message, site: SiteConfig, refusing: str) -> tuple[SiteLedger, list[LedgerEntry]] | Message:
    """The site's ledger and its verified entries, or the reply refusing `refusing` ("to
    train", "the study"): nothing may be planned on a ledger that could have been reset."""
    try:
        ledger = open_site_ledger(site)
        entries = ledger.verified_entries()
        check_not_behind(site, ledger, entries, newest_entry(msg))
        return ledger, entries
    except LedgerBroken as broken:
        print(f"error: {broken}", file=sys.stderr, flush=True)
        reason = (
            broken.reason
            if isinstance(broken, LedgerBehind)
            else f"site {site.name} refuses {refusing}: its privacy ledger does not verify"
        )
        return Message(Error(code=protocol.SITE_REFUSED, reason=reason), reply_to=msg)


def _train(msg: Message, context: Context, run: SiteRunConfig, site: SiteConfig, masker: Masker | None) -> Message:
    """Train on the global model and reply with the update: in the clear, or masked by
    `masker` under secure aggregation (the ledger entry then binds the masked input, which
    is what leaves the site)."""
    opened = _verified_ledger(msg, site, "to train")
    if isinstance(opened, Message):
        return opened
    ledger, entries = opened
    config = msg.content.config_records[protocol.CONFIG]
    server_round = int(protocol.config_number(config, protocol.CONFIG_ROUND))
    mechanism = run.dp.mechanism.mechanism
    if not run.dp.sample_level and not site.allow_non_private:  # decided before any data is read
        spender = _spender(run, site, context, server_round, data_hash="")
        return _refuse(
            msg,
            ledger,
            LedgerRecord.refusal(
                spender, _no_local_dp_refusal(run, site), 0.0, site.accountants[0], mechanism, _noise(run, None)
            ),
        )
    granted = grant(run.study, site, entries, context.run_id) if run.dp.sample_level else Grant(0.0)
    if isinstance(granted, str):  # decided before any data is read
        return _refuse(
            msg,
            ledger,
            LedgerRecord.refusal(
                _spender(run, site, context, server_round, data_hash=""),
                granted,
                0.0,
                site.accountants[0],
                mechanism,
                _noise(run, None),
            ),
        )
    data = _site_data(site, run)
    spender = _spender(run, site, context, server_round, data.identity, granted.epsilon)
    too_many_steps = steps_refusal(site, run, len(data.train))
    if too_many_steps is not None:
        return _refuse(msg, ledger, _refusal_at_spent(run, site, spender, entries, too_many_steps))
    privacy = _planned_privacy(run, site, spender, entries, len(data.train)) if run.dp.sample_level else None
    if isinstance(privacy, LedgerRecord):
        return _refuse(msg, ledger, privacy)
    model = _received_model(msg, run, data)  # built only once the site knows it will train
    try:
        update = train_locally(
            model,
            data.train,
            run,
            privacy,
            resolve_device(run.device),
            site_noise_source(run, site, data, server_round),
            server_round=server_round,
            proximal_mu=float(protocol.config_number(config, protocol.CONFIG_PROXIMAL_MU, 0.0)),
            deadline=time.monotonic() + site.max_round_seconds,
            canaries=_gradient_canaries(data, run),
        )
    except RoundOverTime as over:
        reason = overtime_refusal(site, over.steps, round_steps(len(data.train), run))
        return _refuse(msg, ledger, _refusal_at_spent(run, site, spender, entries, reason))
    arrays = ArrayRecord({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()})
    released, key = arrays, protocol.ARRAYS
    if masker is not None:  # its rounding and noise share draw from their own stream of the site's noise source
        encode = partial(
            integer_update, source=site_noise_source(run, site, data, server_round, SECURE_AGGREGATION_STREAM)
        )
        released, key = (
            masked_input_record(masker(update_vector(arrays, msg.content.array_records[protocol.ARRAYS]), encode)),
            secure_messages.MASKED_INPUT,
        )
    if update.privacy:
        epsilon, accountant = enforced_epsilon(update.privacy, site)
        record = LedgerRecord.release(
            spender, mechanism, _noise(run, update.privacy, update.steps), epsilon, accountant, model_hash(released)
        )
    else:
        epsilon = float("inf")
        record = LedgerRecord.non_private(
            spender, mechanism, update.steps, run.dp.clip_norm, site.accountants[0], model_hash(released)
        )
    entry = ledger.append(record)
    metrics = {
        protocol.NUM_EXAMPLES: update.num_examples,
        protocol.TRAIN_LOSS: update.train_loss,
        protocol.TRAIN_ACCURACY: update.train_accuracy,
        protocol.STEPS: update.steps,
        protocol.NOISE_MULTIPLIER: update.privacy.noise_multiplier if update.privacy else 0.0,
        protocol.SAMPLE_RATE: update.privacy.sample_rate if update.privacy else 0.0,
        protocol.EPSILON: epsilon,
        protocol.DELTA: site.delta,
        protocol.BUDGET_EPSILON: site.epsilon,
    }
    site_record = ConfigRecord(
        {
            protocol.SITE_NAME: site.name,
            protocol.SITE_LEDGER_ENTRY: entry.to_json(),
            protocol.SITE_LEDGER_KEY: ledger.public_key_file.read_text(encoding="ascii"),
        }
    )
    content = RecordDict({key: released, protocol.METRICS: _allowed(metrics, site), protocol.SITE: site_record})
    return Message(content=content, reply_to=msg)


def _planned_privacy(
    run: SiteRunConfig, site: SiteConfig, spender: Spender, entries: list[LedgerEntry], train_size: int
) -> PrivacyState | LedgerRecord:
    """The privacy state this round's DP-SGD will reach, or the refusal to record when no
    noise level keeps the site within its budget."""
    mechanism = run.dp.mechanism.mechanism
    try:
        plan = plan_round(
            run, site, entries, spender.dataset_hash, spender.run_id, spender.round, train_size, spender.study.epsilon
        )
        reason = refusal_reason(plan, round_steps(train_size, run), site)
    except (
        CohortInputError
    ) as unworkable:  # no noise level fits what is left of the grant, or an accountant cannot compose the round
        return _refusal_at_spent(run, site, spender, entries, f"site {site.name} refuses to train: {unworkable}")
    if reason is not None:
        return LedgerRecord.refusal(
            spender,
            reason,
            enforced_epsilon(plan.total, site)[0],
            site.accountants[0],
            mechanism,
            _noise(run, plan.total),
        )
    return plan.total


def _refusal_at_spent(
    run: SiteRunConfig, site: SiteConfig, spender: Spender, entries: list[LedgerEntry], reason: str
) -> LedgerRecord:
    """The refusal of a round that releases nothing, with what the dataset had spent before it."""
    spent = spent_epsilon(entries, spender.dataset_hash, site)
    return LedgerRecord.refusal(
        spender, reason, spent, site.accountants[0], run.dp.mechanism.mechanism, _noise(run, None)
    )


def _gradient_canaries(data: SiteData, run: SiteRunConfig) -> GradientCanaries | None:
    """The audit's gradient canaries, at the simulated canary site only (client.site_data)."""
    if data.gradient_canaries is None:
        return None
    return GradientCanaries(data.gradient_canaries, run.dp.clip_norm)


def _spender(
    run: SiteRunConfig, site: SiteConfig, context: Context, server_round: int, data_hash: str, granted: float = 0.0
) -> Spender:
    """What every ledger record of this site's round shares; the FAB's hash comes from the
    site's own runner (client/site_runner.py), which read the FAB."""
    study = Study(granted, str(context.node_config.get(protocol.FAB_HASH, "")), run.training.model, site.coordinator)
    return Spender(
        context.run_id, server_round, site.name, site.delta, site.epsilon, data_hash, run.site_fingerprint(), study
    )


@app.query()
@one_line_on_failure
def ask(msg: Message, context: Context) -> Message:
    """The coordinator's question before round 1 (before secure aggregation's key stages):
    does this site take part in the study, and at what epsilon? Answered from the site's
    policy and ledger alone, before any data is read; a refusal is recorded in the ledger
    like any other, and a site that refuses is in none of the run's rounds."""
    run = SiteRunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    opened = _verified_ledger(msg, site, "the study")
    if isinstance(opened, Message):
        return opened
    ledger, entries = opened
    granted = grant(run.study, site, entries, context.run_id)
    if isinstance(granted, str):
        spender = _spender(run, site, context, server_round=0, data_hash="")
        return _refuse(
            msg,
            ledger,
            LedgerRecord.refusal(
                spender, granted, 0.0, site.accountants[0], run.dp.mechanism.mechanism, _noise(run, None)
            ),
        )
    metrics = MetricRecord({protocol.STUDY_EPSILON: granted.epsilon})
    # The ledger key lets the coordinator know which node is this site before round 1, so
    # that round 1's instruction already carries the newest entry it holds from the site.
    site_record = ConfigRecord(
        {protocol.SITE_NAME: site.name, protocol.SITE_LEDGER_KEY: ledger.public_key_file.read_text(encoding="ascii")}
    )
    return Message(content=RecordDict({protocol.METRICS: metrics, protocol.SITE: site_record}), reply_to=msg)


def _noise(run: SiteRunConfig, privacy: PrivacyState | None, steps: int = 0) -> Noise:
    """The DP-SGD a round applies (or would have): sigma and Poisson rate q of its plan."""
    if privacy is None:
        return Noise(steps=steps, clip_norm=run.dp.clip_norm)
    return Noise(privacy.noise_multiplier, privacy.sample_rate, Sampling.POISSON, steps, run.dp.clip_norm)


def _allowed(metrics: dict[str, float], site: SiteConfig) -> MetricRecord:
    """Only what aggregation needs and what the site's policy lets leave it."""
    return MetricRecord(
        {name: value for name, value in metrics.items() if name in AGGREGATION_METRICS or name in site.send_metrics}
    )


def _no_local_dp_refusal(run: SiteRunConfig, site: SiteConfig) -> str:
    if run.dp.mechanism.distributed_noise:
        return (
            f"site {site.name} refuses to send updates without sample-level DP: under distributed client-level DP its "
            "own noise share does not protect it, the sum of all sites' shares does, if the coordinator follows the "
            "protocol; a site that trusts it sets allow-non-private=true in its policy"
        )
    if run.dp.client_level:
        return (
            f"site {site.name} refuses to send updates without sample-level DP: under client-level DP only the "
            "coordinator adds noise; a site that trusts it sets allow-non-private=true in its policy"
        )
    return (
        f"site {site.name} refuses to train without differential "
        "privacy; its policy does not allow it (allow-non-private)"
    )


def _refuse(msg: Message, ledger: SiteLedger, refusal: LedgerRecord) -> Message:
    """Record the refusal in the site's own ledger, then tell the server why."""
    ledger.append(refusal)
    return Message(Error(code=protocol.SITE_REFUSED, reason=refusal.reason), reply_to=msg)


@app.evaluate()
@one_line_on_failure
def evaluate_locally(msg: Message, context: Context) -> Message:
    run = SiteRunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    declined = declined_evaluation(msg, site)
    if declined is not None:
        return declined
    data = _site_data(site, run)
    model = _received_model(msg, run, data)
    device = resolve_device(run.device)
    result = evaluate(model.to(device), data.val, device)
    metrics = {
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.VAL_LOSS: result.loss,
        protocol.VAL_ACCURACY: result.accuracy,
    }
    content = RecordDict(
        {protocol.METRICS: _allowed(metrics, site), protocol.SITE: ConfigRecord({protocol.SITE_NAME: site.name})}
    )
    return Message(content=content, reply_to=msg)


def _site_data(site: SiteConfig, run: SiteRunConfig) -> SiteData:
    if site.data_path is not None:
        return local_site_data(site.data_path, site.split_seed, site.val_fraction)
    assert site.partition_id is not None
    return simulated_site_data(run.run_dir, site.partition_id)
