"""The ClientApp: one site's local DP-SGD training and local validation."""

from __future__ import annotations

import json
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol
from common.config import RunConfig
from common.data.federation import SiteData, local_site_data, simulated_site_data
from common.evaluation import evaluate, resolve_device
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.site import SiteConfig
from client.privacy_plan import plan_privacy, refusal_reason, round_steps
from client.training import train_locally

app = ClientApp()

BUDGET_REFUSED = 4030  # error code of a reply that declines a round to stay within budget
_PRIVACY_KEY = "cohort.privacy"


class _SiteRound(NamedTuple):
    """What both handlers start from: the configs, the site's data, the received model."""

    run: RunConfig
    site: SiteConfig
    data: SiteData
    model: torch.nn.Module


def _start_round(msg: Message, context: Context) -> _SiteRound:
    run = RunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    data = _site_data(site, run)
    model = build_model(run.training.model, data.train.input_shape, data.num_classes)
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    return _SiteRound(run, site, data, model)


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, site, data, model = _start_round(msg, context)
    config = msg.content[protocol.CONFIG]
    privacy = None
    if run.dp.enabled:
        privacy = _known_privacy_state(context, config, site) or plan_privacy(run, site, len(data.train))
        reason = refusal_reason(privacy, round_steps(len(data.train), run), site)
        if reason is not None:
            return Message(Error(code=BUDGET_REFUSED, reason=reason), reply_to=msg)
    update = train_locally(
        model,
        data.train,
        run,
        privacy,
        resolve_device(run.device),
        server_round=int(config[protocol.CONFIG_ROUND]),
        proximal_mu=float(config.get(protocol.CONFIG_PROXIMAL_MU, 0.0)),
    )
    epsilon = update.privacy.epsilon(site.delta) if update.privacy else float("inf")
    if update.privacy is not None:
        context.state[_PRIVACY_KEY] = ConfigRecord({protocol.SITE_PRIVACY_STATE: update.privacy.to_json()})
    metrics = MetricRecord(
        {
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
    )
    site_record = ConfigRecord(
        {protocol.SITE_NAME: site.name, protocol.SITE_PRIVACY_STATE: update.privacy.to_json() if update.privacy else ""}
    )
    weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    content = RecordDict({protocol.ARRAYS: ArrayRecord(weights), protocol.METRICS: metrics, protocol.SITE: site_record})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_locally(msg: Message, context: Context) -> Message:
    run, site, data, model = _start_round(msg, context)
    device = resolve_device(run.device)
    result = evaluate(model.to(device), data.val, device)
    metrics = MetricRecord({"num-examples": result.num_examples, "val-loss": result.loss, "val-accuracy": result.accuracy})
    content = RecordDict({protocol.METRICS: metrics, protocol.SITE: ConfigRecord({protocol.SITE_NAME: site.name})})
    return Message(content=content, reply_to=msg)


def _site_data(site: SiteConfig, run: RunConfig) -> SiteData:
    if site.data_path is not None:
        return local_site_data(site.data_path, run.data)
    assert site.partition_id is not None and site.num_partitions is not None
    return simulated_site_data(run.data, site.partition_id, site.num_partitions)


def _known_privacy_state(context: Context, config: ConfigRecord, site: SiteConfig) -> PrivacyState | None:
    """What this site has already spent in this run.

    Its own memory (Context.state) comes first. A resumed run starts new node processes
    with empty state; then the server's copy from the checkpoint continues the count.
    """
    if _PRIVACY_KEY in context.state:
        return PrivacyState.from_json(str(context.state[_PRIVACY_KEY][protocol.SITE_PRIVACY_STATE]))
    known = json.loads(str(config.get(protocol.CONFIG_PRIVACY_STATES, "{}")))
    return PrivacyState.from_json(known[site.name]) if site.name in known else None
