"""Names of the records that cross between the ServerApp and the ClientApp.

Both sides import these so a renamed key cannot silently break the other side.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

SITE_NAME = "name"
SITE_LEDGER_ENTRY = "ledger-entry"
# The site's Ed25519 ledger public key (PEM): the server binds it to the site's name and
# node id on the first reply and verifies every later ledger entry against it.
SITE_LEDGER_KEY = "ledger-public-key"


# The metrics a site's replies may carry (client.policy says which leave a site, docs/site.md
# what each reveals).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
VAL_LOSS = "val-loss"
VAL_ACCURACY = "val-accuracy"
STEPS = "steps"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
EPSILON = "epsilon"
DELTA = "delta"
BUDGET_EPSILON = "budget-epsilon"

# The epsilon a site grants the study, in its answer to the coordinator's ask before round 1.
STUDY_EPSILON = "study-epsilon"

# The node config key under which a deployed site's runner hands its ClientApp the hash of
# the FAB the coordinator submitted (never read from the coordinator's messages).
FAB_HASH = "fab-hash"

CONFIG_ROUND = "server-round"
CONFIG_PROXIMAL_MU = "proximal-mu"
# In an instruction's CONFIG record: the newest signed ledger entry the coordinator has
# accepted from the site it is sent to (LedgerEntry.to_json()), kept across runs in the
# coordinator's site book. A site whose own ledger is behind an entry signed by its own
# key knows it was restored from an older backup. Absent until the site's first release.
SITE_NEWEST_ENTRY = "newest-ledger-entry"


def config_number(config: ConfigRecord, key: str, default: float | None = None) -> float:
    """A number the coordinator's config carries (or `default` when it carries none); any
    other value is a message no Cohort coordinator sends."""
    value = config[key] if default is None else config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"the coordinator's config has {key} = {value!r}, not a number")
    return value


# Error code of a reply in which a site declines a round (budget, or a policy that forbids
# training without DP); the server stops asking that site for the rest of the run.
SITE_REFUSED = 4030

# Error code of a reply in which a site declines to evaluate a model: its policy does not
# let validation results leave it (answer-evaluation = false).
SITE_DECLINED_EVALUATION = 4031
