"""Names of the records that cross between the ServerApp and the ClientApp.

Both sides import these so a renamed key cannot silently break the other side.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

SITE_NAME = "name"
SITE_PRIVACY_STATE = "privacy-state"
SITE_REFUSAL = "refusal"

CONFIG_ROUND = "server-round"
CONFIG_PRIVACY_STATES = "privacy-states"
CONFIG_PROXIMAL_MU = "proximal-mu"
