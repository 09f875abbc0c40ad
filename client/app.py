"""The ClientApp: one site's local DP-SGD training and local validation.

At a deployed site this is the site's own installed code (client/site_runner.py runs it
whatever FAB the coordinator submitted), and everything it decides comes from the site's
policy (common/site.py), never from the run config.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol
from common.config import RunConfig
from common.errors import CohortInputError
from common.flower_logs import readable_flower_logs
from common.data.federation import SiteData, local_site_data, simulated_site_data
from common.evaluation import evaluate, resolve_device
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import CLIENT_LEVEL_DP_FEDAVG, NON_PRIVATE, REFUSAL, RELEASE, SAMPLE_LEVEL_DP_SGD, LedgerBroken, LedgerEntry, LedgerRecord, SiteLedger, sha256_hex
from common.site import AGGREGATION_METRICS, SiteConfig
from client.clipping import central_dp_clipping_mod
from client.dp_randomness import site_noise_source
from client.evaluation_policy import declined_evaluation
from client.privacy_plan import enforced_epsilon, plan_round, refusal_reason, round_steps, spent_epsilon
from client.training import train_locally

readable_flower_logs()
app = ClientApp()


def _received_model(msg: Message, run: RunConfig, data: SiteData) -> torch.nn.Module:
    model = build_model(run.training.model, data.train.input_shape, data.num_classes)
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    return model


@app.train(mods=[central_dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    run = RunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    try:
        ledger = SiteLedger(site.state_dir, create_key=not site.deployed)
        entries = ledger.verified_entries()
    except LedgerBroken as broken:  # nothing may be planned on a ledger that could have been reset
        print(f"error: {broken}", file=sys.stderr, flush=True)
        return Message(Error(code=protocol.SITE_REFUSED, reason=f"site {site.name} refuses to train: its privacy ledger does not verify"), reply_to=msg)
    config = msg.content[protocol.CONFIG]
    server_round = int(config[protocol.CONFIG_ROUND])
    if not run.dp.sample_level and not site.allow_non_private:  # decided before any data is read
        release = _ReleaseContext(run, site, context.run_id, server_round, data_hash="")
        return _refuse(msg, ledger, release.record(REFUSAL, None, steps=0, epsilon=0.0, reason=_no_local_dp_refusal(run, site)))
    data = _site_data(site, run)
    release = _ReleaseContext(run, site, context.run_id, server_round, data.identity)
    privacy = _planned_privacy(release, entries, len(data.train)) if run.dp.sample_level else None
    if isinstance(privacy, LedgerRecord):
        return _refuse(msg, ledger, privacy)
    model = _received_model(msg, run, data)  # built only once the site knows it will train
    update = train_locally(
        model,
        data.train,
        run,
        privacy,
        resolve_device(run.device),
        site_noise_source(run, site, server_round),
        server_round=server_round,
        proximal_mu=float(config.get(protocol.CONFIG_PROXIMAL_MU, 0.0)),
    )
    weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    epsilon, accountant = enforced_epsilon(update.privacy, site) if update.privacy else (float("inf"), site.accountants[0])
    entry = ledger.append(
        dataclasses.replace(
            release.record(
                RELEASE if update.privacy else NON_PRIVATE,
                update.privacy,
                steps=update.steps,
                epsilon=epsilon if update.privacy else 0.0,
                model_hash=sha256_hex(*(t.numpy().tobytes() for t in weights.values())),
            ),
            accountant=accountant,
        )
    )
    metrics = {
        "num-examples": update.num_examples,
        "train-loss": update.train_loss,
        "train-accuracy": update.train_accuracy,
        "steps": update.steps,
        "noise-multiplier": update.privacy.noise_multiplier if update.privacy else 0.0,
        "sample-rate": update.privacy.sample_rate if update.privacy else 0.0,
        "epsilon": epsilon,
        "delta": site.delta,
        "budget-epsilon": site.epsilon,
    }
    site_record = ConfigRecord(
        {
            protocol.SITE_NAME: site.name,
            protocol.SITE_LEDGER_ENTRY: entry.to_json(),
            protocol.SITE_LEDGER_KEY: ledger.public_key_file.read_text(encoding="ascii"),
        }
    )
    content = RecordDict({protocol.ARRAYS: ArrayRecord(weights), protocol.METRICS: _allowed(metrics, site), protocol.SITE: site_record})
    return Message(content=content, reply_to=msg)


def _planned_privacy(release: _ReleaseContext, entries: list[LedgerEntry], train_size: int) -> PrivacyState | LedgerRecord:
    """The privacy state this round's DP-SGD will reach, or the refusal to record when no
    noise level keeps the site within its budget."""
    run, site = release.run, release.site
    try:
        plan = plan_round(run, site, entries, release.data_hash, release.run_id, release.server_round, train_size)
    except CohortInputError as exhausted:  # no noise level fits what is left of the budget
        spent = spent_epsilon(entries, release.data_hash, site)
        return release.record(REFUSAL, None, steps=0, epsilon=spent, reason=f"site {site.name} refuses to train: {exhausted}")
    reason = refusal_reason(plan, round_steps(train_size, run), site)
    if reason is not None:
        return release.record(REFUSAL, plan.total, steps=0, epsilon=enforced_epsilon(plan.total, site)[0], reason=reason)
    return plan.total


def _allowed(metrics: dict[str, float], site: SiteConfig) -> MetricRecord:
    """Only what aggregation needs and what the site's policy lets leave it."""
    return MetricRecord({name: value for name, value in metrics.items() if name in AGGREGATION_METRICS or name in site.send_metrics})


def _no_local_dp_refusal(run: RunConfig, site: SiteConfig) -> str:
    if run.dp.client_level:
        return (
            f"site {site.name} refuses to send updates without sample-level DP: under client-level DP only the "
            "coordinator adds noise; a site that trusts it sets allow-non-private=true in its policy"
        )
    return f"site {site.name} refuses to train without differential privacy; its policy does not allow it (allow-non-private)"


def _refuse(msg: Message, ledger: SiteLedger, refusal: LedgerRecord) -> Message:
    """Record the refusal in the site's own ledger, then tell the server why."""
    ledger.append(refusal)
    return Message(Error(code=protocol.SITE_REFUSED, reason=refusal.reason), reply_to=msg)


@dataclass(frozen=True)
class _ReleaseContext:
    """What every ledger record of this round shares."""

    run: RunConfig
    site: SiteConfig
    run_id: int
    server_round: int
    data_hash: str

    def record(self, kind: str, privacy: PrivacyState | None, steps: int, epsilon: float, model_hash: str = "", reason: str = "") -> LedgerRecord:
        return LedgerRecord(
            kind=kind,
            run_id=self.run_id,
            round=self.server_round,
            site=self.site.name,
            mechanism=_mechanism(self.run),
            noise_multiplier=privacy.noise_multiplier if privacy else 0.0,
            sample_rate=privacy.sample_rate if privacy else 0.0,
            sampling="poisson",
            steps=steps,
            clip_norm=self.run.dp.clip_norm,
            delta=self.site.delta,
            epsilon=epsilon,
            accountant=self.site.accountants[0],
            budget_epsilon=self.site.epsilon,
            dataset_hash=self.data_hash,
            model_hash=model_hash,
            config_hash=self.run.fingerprint(),
            reason=reason,
        )


def _mechanism(run: RunConfig) -> str:
    """The DP mechanism that protects this site's updates, whoever applies it."""
    if run.dp.sample_level:
        return SAMPLE_LEVEL_DP_SGD
    return CLIENT_LEVEL_DP_FEDAVG if run.dp.client_level else "none"


@app.evaluate()
def evaluate_locally(msg: Message, context: Context) -> Message:
    run = RunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    declined = declined_evaluation(msg, site)
    if declined is not None:
        return declined
    data = _site_data(site, run)
    model = _received_model(msg, run, data)
    device = resolve_device(run.device)
    result = evaluate(model.to(device), data.val, device)
    metrics = {"num-examples": result.num_examples, "val-loss": result.loss, "val-accuracy": result.accuracy}
    content = RecordDict({protocol.METRICS: _allowed(metrics, site), protocol.SITE: ConfigRecord({protocol.SITE_NAME: site.name})})
    return Message(content=content, reply_to=msg)


def _site_data(site: SiteConfig, run: RunConfig) -> SiteData:
    if site.data_path is not None:
        return local_site_data(site.data_path, site.split_seed, site.val_fraction)
    assert site.partition_id is not None and site.num_partitions is not None
    return simulated_site_data(run.data, site.partition_id, site.num_partitions, run.run_dir)
