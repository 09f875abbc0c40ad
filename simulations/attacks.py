"""Hostile sites for simulations: what a compromised or broken site does, in one place.

The honest ClientApp (client/app.py) knows nothing of this module. When a simulation plan
names an attack, the runner submits a copy of the app whose ClientApp is `app` below:
every site runs the honest ClientApp, and the sites in `attack-sites` (read from the plan
in the run directory, simulation.json) bend it:

- sign-flip: sends the global model minus its honest update (same norm, opposite way);
- boost: sends the global model plus `attack-scale` times its honest update;
- nan: sends its update with every value NaN;
- label-flip: trains honestly on its data with every label y replaced by (classes-1-y);
- backdoor: trains honestly on its data with half its images stamped with a bright
  2x2 patch in the top-left corner and relabelled as class 0
  (both poison the data the runner writes for the site: simulations/data_poisoning.py;
  the site then answers as the honest ClientApp does);
- silent: holds every training message and never answers it (it still evaluates, so that
  on 2 cores the one simulation worker it blocks is all it takes).

A hostile site owns its ledger key, so it signs its ledger entry for whatever it sends:
its spend is real, and its signature proves only that it sent this update.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import app as honest
from client.policy import SiteConfig
from common import protocol
from common.config import SiteRunConfig
from common.privacy.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    PRIVATE_KEY_FILE,
    LedgerEntry,
    model_hash,
    sign_entry,
    sign_head,
    write_head,
)
from simulations.attack_spec import DATA_ATTACKS, AttackSpec
from simulations.plan import PLAN_FILE

SILENT_S = 24 * 3600.0


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack, scale = _attack_of(context)
    if attack is None or attack in DATA_ATTACKS:
        return honest(msg, context)
    if attack == "silent":
        time.sleep(SILENT_S)
    reply = honest(msg, context)
    if reply.has_error():
        return reply
    _tamper(reply, msg.content.array_records[protocol.ARRAYS], attack, scale, context)
    return reply


@app.query()
def ask(msg: Message, context: Context) -> Message:
    """A hostile site answers the study's ask honestly: its attacks are on what it sends."""
    return honest(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A hostile site evaluates honestly, on its own (for a data attack, poisoned) data."""
    return honest(msg, context)


def _attack_of(context: Context) -> tuple[str | None, float]:
    """This simulated site's attack (None when it is honest) and the boost factor, from the
    plan the runner wrote into the run directory."""
    plan = json.loads(
        (Path(SiteRunConfig.from_flower(context.run_config).run_dir) / PLAN_FILE).read_text(encoding="utf-8")
    )
    if "attack" not in plan:
        return None, 1.0
    spec = AttackSpec.from_json(plan["attack"])
    return spec.attack_of(int(context.node_config.get("partition-id", -1))), spec.attack_scale


def _tamper(reply: Message, global_arrays: ArrayRecord, attack: str, scale: float, context: Context) -> None:
    """Replace the honest update, then sign the ledger entry for what is sent instead."""
    sent = reply.content.array_records[protocol.ARRAYS]
    tampered = {}
    for name, array in sent.items():
        honest_value, start = array.numpy(), global_arrays[name].numpy()
        if attack == "sign-flip":
            value = start - (honest_value - start)
        elif attack == "boost":
            value = start + scale * (honest_value - start)
        else:
            value = np.full_like(honest_value, np.nan)
        tampered[name] = Array(np.ascontiguousarray(value.astype(honest_value.dtype)))
    send_instead(reply, ArrayRecord(tampered), context)


def send_instead(reply: Message, arrays: ArrayRecord, context: Context) -> None:
    """Make `arrays` the site's reply, and sign its ledger entry for them instead."""
    reply.content[protocol.ARRAYS] = arrays
    site_record = reply.content.config_records[protocol.SITE]
    entry = LedgerEntry.from_json(str(site_record[protocol.SITE_LEDGER_ENTRY]))
    site_record[protocol.SITE_LEDGER_ENTRY] = _resign(_state_dir(context), entry, model_hash(arrays)).to_json()


def _resign(state_dir: Path, entry: LedgerEntry, sent_hash: str) -> LedgerEntry:
    """The site's own last ledger entry, rewritten for the tampered model and signed again."""
    key = serialization.load_pem_private_key((state_dir / PRIVATE_KEY_FILE).read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey), "SiteLedger makes every site key an Ed25519 key"
    signed = sign_entry(
        key, entry.sequence, entry.previous_hash, dataclasses.replace(entry.record, model_hash=sent_hash)
    )
    ledger = state_dir / LEDGER_FILE
    lines = ledger.read_text(encoding="utf-8").splitlines()
    lines[-1] = signed.to_json()
    ledger.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # its own ledger: it keeps it consistent
    write_head(state_dir / HEAD_FILE, sign_head(key, len(lines), signed.entry_hash()))
    return signed


def _state_dir(context: Context) -> Path:
    return SiteConfig.from_node_config(context.node_config, SiteRunConfig.from_flower(context.run_config)).state_dir
