"""What a site decides for itself: its data, its privacy budget, its state directory,
which code it runs and what leaves it.

Only the site may decide how its data is used; the coordinator's run config cannot
override any of this. A deployed site (one with a data-path) reads its policy from its
node config (`--node-config`, written by `cohort supernode`) and from `policy.toml` in its
state directory, and from nowhere else: the node config wins where both set a key, and
the state directory itself must come from the node config.

A simulated site (Flower gives it just a partition id) belongs to the researcher who runs
the simulation: where it sets nothing, the run config's site-epsilon / site-delta /
site-allow-non-private / federation-home / accountant are its defaults, and it reports
every metric so that the simulation's summaries and plots can be drawn.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import protocol
from common.config import ACCOUNTANTS, EPSILON_RANGE, Range, SiteRunConfig, validate_budget
from common.errors import CohortInputError
from common.private_files import open_private

POLICY_FILE = "policy.toml"
# The policy key pinning the fingerprint of the site's ledger key.
LEDGER_KEY = "ledger-key"

# What a site's replies may carry besides the weights (see docs/site.md for what each reveals).
# Always sent: the example count, which the server may weigh by (aggregation-weight =
# "examples", capped); the server never trusts it beyond its cap.
AGGREGATION_METRICS = (protocol.NUM_EXAMPLES,)
ACCOUNTING_METRICS = (
    protocol.EPSILON,
    protocol.DELTA,
    protocol.BUDGET_EPSILON,
    protocol.NOISE_MULTIPLIER,
    protocol.SAMPLE_RATE,
    protocol.STEPS,
)
TRAINING_METRICS = (protocol.TRAIN_LOSS, protocol.TRAIN_ACCURACY)
VALIDATION_METRICS = (protocol.VAL_LOSS, protocol.VAL_ACCURACY)
OPTIONAL_METRICS = ACCOUNTING_METRICS + TRAINING_METRICS + VALIDATION_METRICS

DEFAULT_RUN_WINDOW_HOURS = 24.0
# A deployed site's default per-study cap, as a share of its lifetime budget: a quarter
# leaves room for at least four studies at the full cap, and no one study can take what
# the dataset owes every later one (docs/site.md, "For the privacy officer").
DEFAULT_STUDY_SHARE = 0.25
# The largest sigma a site trains with by default: above it the default CNN no longer
# learns in a short simulation (docs/site.md gives the measurement).
DEFAULT_MAX_NOISE_MULTIPLIER = 8.0
DEFAULT_VAL_FRACTION = 0.1
# The most work one round may ask of a site (docs/site.md): 10,000 local DP-SGD steps is
# 50 epochs of 50,000 examples at batch 256, far beyond what federated rounds use, yet it
# stops a run config whose local-epochs would keep the site's machine busy for days; an
# hour of wall time bounds a round whose every step is slow (a large model, a slow machine).
DEFAULT_MAX_ROUND_STEPS = 10_000
DEFAULT_MAX_ROUND_SECONDS = 3600.0
# The valid values of the policy's numeric keys besides the budget (EPSILON_RANGE, DELTA_RANGE).
RUN_WINDOW_HOURS_RANGE = Range(0, 24 * 366, low_open=True)
VAL_FRACTION_RANGE = Range(0, 1, low_open=True, high_open=True)
SPLIT_SEED_RANGE = Range(0, 2**32 - 1)
MAX_ROUND_STEPS_RANGE = Range(1, 10**9)
MAX_ROUND_SECONDS_RANGE = Range(0, 30 * 86400, low_open=True)
MAX_NOISE_MULTIPLIER_RANGE = Range(0, 100, low_open=True)  # as a run's noise-multiplier


@dataclass(frozen=True)
class SiteConfig:
    """One site's own settings.

    name: how the site is named in metrics, ledgers and checkpoints.
    epsilon: the site's total privacy budget for its dataset, over every run.
    delta: the delta of the site's (epsilon, delta) guarantee.
    state_dir: where the site keeps its ledger and signing key; it outlives runs.
    run_epsilon: an optional cap on what the site spends within any run_window_hours
        (None for no cap). The site cannot tell a coordinator's runs apart (it makes run
        ids at will), so a "run", for the cap, is everything released in that window.
    run_window_hours: the window of that cap, on the site's own clock.
    study_epsilon: the most one study may be granted of the budget (client/study_grant.py);
        a deployed site's default is DEFAULT_STUDY_SHARE of `epsilon`, a simulated site's
        all of it.
    max_noise_multiplier: the largest sigma the site trains with: a study whose planned
        noise is larger would train on noise, and is refused.
    coordinator: the SuperLink the site answers (deployment), as its ledger records it.
    max_round_steps, max_round_seconds: the most work one round may ask (local DP-SGD
        steps, from local-epochs, the dataset's size and the batch size) and may take (wall
        time); a site refuses a round beyond either (DEFAULT_MAX_ROUND_STEPS, _SECONDS).
    ledger_key: the fingerprint of the site's ledger key, pinned in its policy (`cohort
        site init` writes it; a simulated site's first round does): a state directory
        holding another key refuses to train. None: not pinned yet.
    allow_non_private: whether the site trains at all when a run asks for no DP; off
        unless the site's policy turns it on, since such training has no guarantee.
    accountants: the Opacus accountants whose epsilon is enforced; the largest counts.
    send_metrics: the optional metrics (OPTIONAL_METRICS) the site's replies carry.
    answer_evaluation: whether the site evaluates models the coordinator sends on its
        validation data at all.
    split_seed, val_fraction: the site's own, stable train/validation split (deployment).
    data_path: the site's own data (deployment); None means a simulated partition.
    partition_id, num_partitions: which simulated partition this site holds.
    """

    name: str
    epsilon: float
    delta: float
    state_dir: Path
    run_epsilon: float | None = None
    run_window_hours: float = DEFAULT_RUN_WINDOW_HOURS
    study_epsilon: float = 0.0
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER
    coordinator: str = "simulation"
    max_round_steps: int = DEFAULT_MAX_ROUND_STEPS
    max_round_seconds: float = DEFAULT_MAX_ROUND_SECONDS
    ledger_key: str | None = None
    allow_non_private: bool = False
    accountants: tuple[str, ...] = ("rdp",)
    send_metrics: tuple[str, ...] = OPTIONAL_METRICS
    answer_evaluation: bool = True
    split_seed: int = 0
    val_fraction: float = DEFAULT_VAL_FRACTION
    data_path: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None

    @property
    def deployed(self) -> bool:
        return self.data_path is not None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: SiteRunConfig) -> SiteConfig:
        """The site's policy as its ClientApp reads it, every key checked, the accountants it
        names against Opacus' too."""
        site = (
            cls.deployed_site(node_config)
            if node_config.get("data-path") is not None
            else cls.simulated_site(node_config, run)
        )
        _names(site.accountants, "accountants", ACCOUNTANTS)
        return site

    @classmethod
    def deployed_site(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """A real site: everything from its node config and its policy.toml, nothing from a run.

        Every key is checked but the accountants' names, which need Opacus (and so PyTorch)
        loaded: the site's runner reads the policy with this to refuse code or decline an
        evaluation before it loads any of that; from_node_config checks them too."""
        name = str(node_config.get("site-name", "site"))
        if "state-dir" not in node_config:
            raise CohortInputError(
                f"site {name} sets no state-dir: a deployed site keeps its ledger and key in its own folder; "
                "add state-dir=PATH to --node-config (cohort supernode --state-dir does)"
            )
        state_dir = Path(str(node_config["state-dir"])).expanduser().resolve()
        policy = {**_read_policy(state_dir / POLICY_FILE), **node_config}
        missing = [key for key in ("epsilon", "delta") if key not in policy]
        if missing:
            raise CohortInputError(
                f"site {name} sets no {' or '.join(missing)}: a deployed site chooses its own privacy budget; "
                f'add it to --node-config (e.g. "epsilon=8 delta=1e-5") or to {state_dir / POLICY_FILE}'
            )
        return cls(
            name=name,
            epsilon=_number(policy["epsilon"], "epsilon"),
            delta=_number(policy["delta"], "delta"),
            state_dir=state_dir,
            accountants=_names(policy.get("accountants", "rdp"), "accountants"),
            send_metrics=_names(
                policy.get("send-metrics", ",".join(ACCOUNTING_METRICS)),
                "send-metrics",
                OPTIONAL_METRICS,
                allow_empty=True,
            ),
            answer_evaluation=_flag(policy.get("answer-evaluation", False), "answer-evaluation"),
            split_seed=int(_number(policy.get("split-seed", 0), "split-seed", SPLIT_SEED_RANGE)),
            val_fraction=_number(policy.get("val-fraction", DEFAULT_VAL_FRACTION), "val-fraction", VAL_FRACTION_RANGE),
            data_path=str(node_config["data-path"]),
            coordinator=str(node_config.get("coordinator", "")),
            **_shared_policy(policy, name, allow_non_private_default=False, study_share=DEFAULT_STUDY_SHARE),
        )

    @classmethod
    def simulated_site(cls, node_config: Mapping[str, Any], run: SiteRunConfig) -> SiteConfig:
        """A simulated site: the run config's site-* settings are its defaults."""
        partition_id = node_config.get("partition-id")
        num_partitions = node_config.get("num-partitions")
        if partition_id is None or num_partitions is None:
            raise CohortInputError("the node config names no data: set data-path=PATH in --node-config")
        name = str(node_config.get("site-name", f"site-{partition_id}"))
        state_dir = Path(str(node_config.get("state-dir", Path(run.federation_home) / name))).expanduser().resolve()
        policy = {
            "epsilon": run.site_epsilon,
            "delta": run.site_delta,
            **_read_policy(state_dir / POLICY_FILE),
            **node_config,
        }
        return cls(
            name=name,
            epsilon=_number(policy["epsilon"], "epsilon"),
            delta=_number(policy["delta"], "delta"),
            state_dir=state_dir,
            accountants=_names(policy.get("accountants", run.dp.accountant), "accountants"),
            send_metrics=_names(
                policy.get("send-metrics", ",".join(OPTIONAL_METRICS)),
                "send-metrics",
                OPTIONAL_METRICS,
                allow_empty=True,
            ),
            answer_evaluation=_flag(policy.get("answer-evaluation", True), "answer-evaluation"),
            partition_id=int(partition_id),
            num_partitions=int(num_partitions),
            **_shared_policy(policy, name, allow_non_private_default=run.site_allow_non_private, study_share=1.0),
        )


def _shared_policy(
    policy: Mapping[str, Any], name: str, allow_non_private_default: bool, study_share: float
) -> dict[str, Any]:
    """The keys a deployed and a simulated site read alike, validated; `study_share`: the
    share of the budget one study may have where the policy sets no study-epsilon."""
    epsilon = _number(policy["epsilon"], "epsilon")
    validate_budget(epsilon, _number(policy["delta"], "delta"), source=f"site {name}'s policy")
    study_epsilon = _number(policy.get("study-epsilon", study_share * epsilon), "study-epsilon", EPSILON_RANGE)
    if study_epsilon > epsilon:
        raise CohortInputError(
            f"study-epsilon is {study_epsilon} in site {name}'s policy; a per-study cap must be > 0 and at most "
            f"epsilon ({epsilon:g})"
        )
    run_epsilon = policy.get("run-epsilon")
    return {
        "run_epsilon": _number(run_epsilon, "run-epsilon", EPSILON_RANGE) if run_epsilon is not None else None,
        "run_window_hours": _number(
            policy.get("run-window-hours", DEFAULT_RUN_WINDOW_HOURS), "run-window-hours", RUN_WINDOW_HOURS_RANGE
        ),
        "study_epsilon": study_epsilon,
        "max_noise_multiplier": _number(
            policy.get("max-noise-multiplier", DEFAULT_MAX_NOISE_MULTIPLIER),
            "max-noise-multiplier",
            MAX_NOISE_MULTIPLIER_RANGE,
        ),
        "max_round_steps": int(
            _number(policy.get("max-round-steps", DEFAULT_MAX_ROUND_STEPS), "max-round-steps", MAX_ROUND_STEPS_RANGE)
        ),
        "max_round_seconds": _number(
            policy.get("max-round-seconds", DEFAULT_MAX_ROUND_SECONDS), "max-round-seconds", MAX_ROUND_SECONDS_RANGE
        ),
        "allow_non_private": _flag(policy.get("allow-non-private", allow_non_private_default), "allow-non-private"),
        "ledger_key": _fingerprint(policy[LEDGER_KEY]) if LEDGER_KEY in policy else None,
    }


def pinned_ledger_key(state_dir: Path) -> str | None:
    """The ledger key fingerprint the site's policy.toml pins, if it pins one."""
    value = _read_policy(state_dir / POLICY_FILE).get(LEDGER_KEY)
    return None if value is None else _fingerprint(value)


def pin_ledger_key(state_dir: Path, fingerprint: str) -> None:
    """Pin the site's ledger key in its policy.toml (the first line, so it belongs to the
    file's top-level table), leaving the rest of the file as the operator wrote it."""
    path = state_dir / POLICY_FILE
    rest = path.read_text(encoding="utf-8") if path.exists() else ""
    with open_private(path.with_suffix(".tmp"), "w") as stream:
        stream.write(
            f'{LEDGER_KEY} = "{fingerprint}"  # the ledger key\'s fingerprint: keep a copy off this machine\n{rest}'
        )
    os.replace(path.with_suffix(".tmp"), path)


def _fingerprint(value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"SHA256:[0-9a-f]{64}", text):
        raise CohortInputError(
            f"{LEDGER_KEY} is {text!r} in the site's policy; "
            "it must be the fingerprint `cohort site init` prints (SHA256:<64 hex digits>)"
        )
    return text


def _read_policy(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as error:
        raise CohortInputError(f"{path} is not valid TOML ({error}); fix the site's policy file") from None


def _names(value: Any, key: str, choices: tuple[str, ...] | None = None, allow_empty: bool = False) -> tuple[str, ...]:
    """A list in policy.toml (or the tuple already read), or a comma-separated string in the
    node config; its names among `choices` when there are any to check against."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names and not allow_empty:
        raise CohortInputError(
            f"{key} is empty in the site's policy; name at least one{' of ' + ', '.join(choices) if choices else ''}"
        )
    unknown = [name for name in names if name not in choices] if choices is not None else []
    if unknown:
        raise CohortInputError(
            f"{key} names {', '.join(unknown)} in the site's policy; choose from {', '.join(choices or ())}"
        )
    return names


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise CohortInputError(f"{name} is {value!r} in the site's policy; use true or false")


def _number(value: Any, name: str, valid: Range | None = None) -> float:
    """A number of the policy, within `valid` when given (the budget's are checked together)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CohortInputError(f"{name} is {value!r} in the site's policy; it must be a number") from None
    if valid is not None:
        valid.check(f"{name} in the site's policy", number)
    return number
