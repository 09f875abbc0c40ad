"""Flower's floor: a ClientApp that does no work of its own, to measure what a simulated
site-round costs in Flower and in Cohort's server when the site adds nothing.

Each site answers a training message with the global model it received, unchanged, and
with the least Cohort's server needs to count a reply: a name, an example count and a
signed ledger entry for a release without DP (so the run must set dp = false). It loads
no data, builds no model, keeps no ledger on disk and evaluates nothing: an evaluation
message gets an empty report back. The difference between a Cohort site-round and this
one is what Cohort's ClientApp costs; `benchmarks/scale.py` measures both side by side.

The signing key is derived from the site's name, because Flower may hand the same site to
a different simulation worker in a later round and the server holds a site to the key it
first used. Entries take sequence 2 x round, never consecutive, so that no entry needs to
link to one a worker that is gone made. Both would be wrong for a real site, which is why
this lives in benchmarks/ and never in the app.
"""

from __future__ import annotations

import hashlib
from functools import cache, lru_cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol
from common.config import SiteRunConfig
from common.privacy.ledger import LedgerRecord, Spender, model_hash, sign_entry
from common.privacy.mechanisms import Mechanism

app = ClientApp()


@cache
def _key(site: str) -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"flower-floor/{site}".encode()).digest())
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return key, public


@lru_cache(maxsize=8)
def _fingerprint(items: tuple[tuple[str, object], ...]) -> str:
    return SiteRunConfig.from_flower(dict(items)).site_fingerprint()


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = f"site-{context.node_config['partition-id']}"
    server_round = int(protocol.config_number(msg.content.config_records[protocol.CONFIG], protocol.CONFIG_ROUND))
    arrays = msg.content.array_records[protocol.ARRAYS]
    spender = Spender(
        context.run_id,
        server_round,
        site,
        0.0,
        0.0,
        dataset_hash="",
        config_hash=_fingerprint(tuple(sorted(context.run_config.items()))),
    )
    record = LedgerRecord.non_private(
        spender, Mechanism.NONE, steps=0, clip_norm=0.0, accountant="rdp", model_hash=model_hash(arrays)
    )
    key, public = _key(site)
    entry = sign_entry(key, 2 * server_round, "", record)
    site_record = ConfigRecord(
        {protocol.SITE_NAME: site, protocol.SITE_LEDGER_ENTRY: entry.to_json(), protocol.SITE_LEDGER_KEY: public}
    )
    content = RecordDict(
        {
            protocol.ARRAYS: arrays,
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 1}),
            protocol.SITE: site_record,
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = f"site-{context.node_config['partition-id']}"
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 1}),
            protocol.SITE: ConfigRecord({protocol.SITE_NAME: site}),
        }
    )
    return Message(content=content, reply_to=msg)
