"""The run settings a site reads: one typed, validated object built from Flower's run config.

A run config holds the settings every site reads to train (this module's SiteRunConfig:
the model, local training, the DP the site applies, where a simulated site finds its data
and state, and a simulated site's default policy) and the coordinator's own (strategy,
checks, its data and test set, ...: server.run_config.RunConfig, which extends this one).
A site parses only its own keys and ignores every other: a coordinator whose own code or
settings changed still finds its sites answering, as long as the site package (client/
and common/) is the one they installed. docs/site.md states the rule.

What belongs to a site itself, its data and its privacy budget, is its policy
(client.policy.SiteConfig), read from the site's node config and never from a run config.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Self

from common.errors import CohortInputError
from common.privacy.mechanisms import DPLevel, MechanismSpec, mechanism_of

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MODELS = ("cnn", "scatternet", "transformer")
# Opacus' accountants (its registry, opacus.accountants.registry: what create_accountant
# builds), named here so that checking a setting does not load Opacus and with it PyTorch
# and SciPy, seconds of a command's start; tests/test_privacy_accounting.py holds the two equal.
ACCOUNTANTS = ("rdp", "prv", "gdp")
# Opacus' ways of computing per-sample gradients that fit a site (each gives the clipped
# update of hooks; the training loop takes an empty Poisson batch's step itself, since ew
# and functorch fail on one). A run may also say 'auto': AUTO_GRAD_SAMPLE_MODE's.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# model -> the fastest mode for it (docs/benchmarks.md): ew (PyTorch's expanded weights)
# beats hooks, functorch and ghost clipping for the transformer at the batch sizes Cohort
# uses; it cannot run the weight-standardised convolutions of the cnn and the scatternet,
# for which Cohort registers a per-sample rule that hooks uses.
AUTO_GRAD_SAMPLE_MODE = {"cnn": "hooks", "scatternet": "hooks", "transformer": "ew"}
# (model, mode) -> why that mode cannot train that model.
UNSUPPORTED_GRAD_SAMPLE_MODES = {
    ("transformer", "ghost"): "Opacus' ghost clipping fails on the transformer",
    ("cnn", "ew"): "PyTorch's expanded weights cannot differentiate the cnn's weight standardisation",
    ("scatternet", "ew"): "PyTorch's expanded weights cannot differentiate the scatternet's weight standardisation",
}
DEVICES = ("auto", "cpu", "cuda")
CLIENT_CLIPPINGS = ("fixed", "adaptive")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
# Where DP noise comes from (common/privacy/noise.py): a cipher's keystream, or a generator
# seeded by the run's seed. A deployed site always takes the secure one (client/dp_randomness.py).
SECURE_NOISE = "secure"
SEEDED_NOISE = "seeded"
NOISE_SOURCES = (SECURE_NOISE, SEEDED_NOISE)


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: finite, from low to high, either end open.

    Every numeric setting declares one (number()), so that a value no run can mean (inf,
    NaN, 1e30, a negative count) is refused where it is parsed, naming the key, and
    never reaches Opacus or a site's machine. note says what a special value means.
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def check(self, name: str, value: float) -> None:
        """Refuse `value` for the setting `name` unless it lies in this range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if not (math.isfinite(value) and above and below):
            kind = "an integer" if isinstance(value, int) else "a finite number"
            note = f" ({self.note})" if self.note else ""
            raise CohortInputError(f"{name} is {value!r}; it must be {kind} in {self}{note}")

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


RANGE = "range"
EPSILON_RANGE = Range(0, 1000, low_open=True)
DELTA_RANGE = Range(0, 1, low_open=True, high_open=True)


def number(
    default: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False, note: str = ""
) -> Any:
    """A numeric setting's field with its default and its valid range."""
    return field(default=default, metadata={RANGE: Range(low, high, low_open, high_open, note)})


def in_range(default: float, valid: Range) -> Any:
    """A numeric setting's field whose range is shared with another check (a budget's)."""
    return field(default=default, metadata={RANGE: valid})


def check_ranges(settings: DataclassInstance) -> None:
    """Every numeric field of a settings dataclass, against the range it declares."""
    for item in dataclasses.fields(settings):
        if RANGE in item.metadata:
            item.metadata[RANGE].check(item.name.replace("_", "-"), getattr(settings, item.name))


@dataclass(frozen=True)
class DPConfig:
    """The differential privacy of this run, as far as a site applies it.

    enabled: train with DP; off only for a non-private baseline.
    dp_level: 'sample' protects every example with Opacus DP-SGD at each site (the
        sites' own budgets, cross-silo); 'client' protects every client's whole update
        with central DP-FedAvg through Flower's DP strategy wrappers (the server's
        budget for the run, cross-device; its settings are the coordinator's,
        server.run_config.CentralDPConfig).
    noise_multiplier: sigma, the Gaussian noise std in units of clip_norm. 0 derives it:
        at sample level each site from its own budget, at client level the server from
        client_epsilon over the run's rounds.
    clip_norm: C, the bound on every example's gradient (sample level) or on every
        client's update (client level; the starting value under adaptive clipping).
    accountant: the Opacus accountant used to derive sigma and enforce budgets, one of
        Opacus' own registry (a simulated site's default; a deployed site names its own).
    grad_sample_mode: how Opacus computes per-sample gradients; every mode computes the
        same clipped, noised update, so this is speed only. 'auto' (the default) becomes
        the fastest mode for the model, AUTO_GRAD_SAMPLE_MODE: 'ew' for the transformer,
        measured on one thread at batch 64 and 256 on 8x8 and 28x28 input, 9-27% less
        time a step than 'hooks' and faster than 'functorch' and 'ghost' in every case
        (benchmarks/dp_step_time.py, docs/benchmarks.md); 'hooks' for the cnn, whose
        weight-standardised convolutions 'ew' cannot run. UNSUPPORTED_GRAD_SAMPLE_MODES
        are refused ('ghost' fails on the transformer).
    client_clipping: 'fixed' C, or 'adaptive' (Andrew et al. 2021): C follows the
        target_clipped_quantile of update norms, learnt at rate clip_norm_lr from a
        noisy count of clipped updates (a site clipping its own update uses Flower's mod
        for the one or the other).
    secure_aggregation: the sites' updates reach the coordinator only masked, and it
        unmasks nothing but their sum (SecAgg+, client/secure_aggregation.py); at client
        level each site adds its share of Skellam noise before masking (distributed DP,
        Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM) instead of the server adding the
        noise. Its parameters are the coordinator's (server.run_config.SecureAggregationConfig)
        and reach each site with the round's first message.
    """

    enabled: bool = True
    dp_level: DPLevel = DPLevel.SAMPLE
    noise_multiplier: float = number(0.0, 0, 100, note="0 derives it from the site budget")
    clip_norm: float = number(1.0, 0, 1000, low_open=True)
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    client_clipping: str = "fixed"
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dp_level", DPLevel(require_choice("dp-level", self.dp_level, tuple(DPLevel))))

    def validate(self) -> None:
        check_ranges(self)
        require_choice("accountant", self.accountant, ACCOUNTANTS)
        require_choice("grad-sample-mode", self.grad_sample_mode, ("auto", *GRAD_SAMPLE_MODES))
        require_choice("client-clipping", self.client_clipping, CLIENT_CLIPPINGS)

    @property
    def mechanism(self) -> MechanismSpec:
        return mechanism_of(self.enabled, self.dp_level, self.secure_aggregation)

    @property
    def client_level(self) -> bool:
        return self.mechanism.server_accounts

    @property
    def sample_level(self) -> bool:
        return self.mechanism.site_noise


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each site.

    model: a name in common/models/registry.py; the scatternet (fixed wavelet features
        under a small CNN) learns most under DP-SGD (docs/benchmarks.md), so it is the default.
    rounds: the run's rounds; a site plans its noise over the rounds still to come, and
        decays its learning rate over them.
    optimizer: the local optimizer, fresh every round: 'sgd' (with momentum) or 'adam'
        (what transformers need); under DP, Opacus wraps either.
    batch_size, learning_rate: 0 picks what trains well for the optimizer and whether the
        sites train with DP-SGD (AUTO_LOCAL_TRAINING): clipped, noised gradients want large
        batches and a large rate, plain ones small batches and a small rate, so a user who
        switches DP off or on with one setting still gets a model that learns.
    lr_schedule: 'constant', or 'cosine' decay of the local rate over the rounds (to a
        tenth of learning_rate in the last round).
    """

    model: str = "scatternet"
    rounds: int = number(50, 1, 100_000)
    local_epochs: int = number(1, 1, 10_000)
    batch_size: int = number(0, 0, 1_000_000, note="0 picks the default of the DP mode")
    learning_rate: float = number(0.0, 0, 100, note="0 picks the default of the DP mode")
    momentum: float = number(0.9, 0, 1, high_open=True)
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"

    def validate(self) -> None:
        require_choice("model", self.model, MODELS)
        require_choice("optimizer", self.optimizer, OPTIMIZERS)
        require_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        check_ranges(self)


@dataclass(frozen=True)
class StudyRequest:
    """What this run (a study) asks of every site's privacy budget; each site grants it or
    refuses the study before touching its data (client/study_grant.py).

    study_epsilon: the epsilon the study may spend at each site over all its rounds. 0
        asks for all that a site will grant: what it has left, up to its per-study cap (a
        simulated site's cap is its whole budget, so a simulation spends it all, as the
        demo always has; a deployed site's is a share of it, docs/site.md).
    study_delta: the delta the study needs; 0 takes each site's own. A site whose delta is
        larger than this refuses: it cannot promise a smaller one.
    """

    study_epsilon: float = number(0.0, 0, EPSILON_RANGE.high, note="0 asks for all each site will grant")
    study_delta: float = number(0.0, 0, 1, high_open=True, note="0 takes each site's own delta")

    def validate(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class SiteRunConfig:
    """What a site reads of a run config, validated once on construction.

    run_dir: where the run writes; a simulated site finds its data there. '' means
        runs/<run_name>-<timestamp>.
    device: where sites train: 'auto' takes CUDA when visible.
    study: the epsilon and delta this run asks of each site (StudyRequest).
    federation_home: where simulated sites keep their state (ledger, key, policy), one
        folder per site; sites spend from the same budget in every run that shares it.
    site_epsilon, site_delta, site_allow_non_private: the policy of a simulated site that
        sets none itself (a site's own policy always wins; see client.policy).
    noise_source: where the DP noise of simulated sites and of the coordinator (under
        client-level DP) comes from: 'secure' (a CSPRNG, never seeded; the default, so a
        deployed coordinator gets it) or 'seeded' (from the run's seed, the site and the
        round, so the same seed gives the same run; `cohort simulate` defaults to it; a
        simulated site takes the seed with its data, client.site_data). A deployed site
        always draws secure noise, whatever this says.
    """

    # Settings that say where a run lives or who could predict its noise, not what it
    # computes: they may differ between a run and its resumption, or between a site's view
    # and the coordinator's.
    PLACEMENT_KEYS: ClassVar[frozenset[str]] = frozenset({"run_dir", "device", "federation_home", "noise_source"})

    run_dir: str = ""
    device: str = "auto"
    federation_home: str = "runs/federation"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    study: StudyRequest = field(default_factory=StudyRequest)
    site_epsilon: float = in_range(8.0, EPSILON_RANGE)
    site_delta: float = in_range(1e-5, DELTA_RANGE)
    site_allow_non_private: bool = False
    noise_source: str = SECURE_NOISE

    def __post_init__(self) -> None:
        check_ranges(self)
        require_choice("device", self.device, DEVICES)
        require_choice("noise-source", self.noise_source, NOISE_SOURCES)
        self.training.validate()
        self.dp.validate()
        self.study.validate()
        object.__setattr__(self, "training", _with_local_training_defaults(self.training, self.dp.sample_level))
        if self.dp.grad_sample_mode == "auto":
            object.__setattr__(
                self, "dp", dataclasses.replace(self.dp, grad_sample_mode=AUTO_GRAD_SAMPLE_MODE[self.training.model])
            )
        unsupported = UNSUPPORTED_GRAD_SAMPLE_MODES.get((self.training.model, self.dp.grad_sample_mode))
        if unsupported:
            usable = [
                m for m in ("auto", *GRAD_SAMPLE_MODES) if (self.training.model, m) not in UNSUPPORTED_GRAD_SAMPLE_MODES
            ]
            raise CohortInputError(f"{unsupported}; use {', '.join(usable[:-1])} or {usable[-1]}")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> Self:
        """A site's view of Flower's flat run config: its own keys; every other key is the
        coordinator's, and a site ignores it (docs/site.md)."""
        own = flat_settings(cls)
        return cls.from_settings({key: value for key, value in run_config.items() if key.replace("-", "_") in own})

    @classmethod
    def from_settings(cls, run_config: Mapping[str, Any]) -> Self:
        """Build from flat settings that are all this class's own (keys as in pyproject's
        [tool.flwr.app.config])."""
        known = flat_settings(cls)
        sections: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            section, attribute, kind = known[key.replace("-", "_")]
            sections.setdefault(section, {})[attribute] = _coerce(key, value, kind)
        top = sections.pop("", {})
        kinds = {
            f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING
        }
        return cls(**top, **{section: kinds[section](**values) for section, values in sections.items()})

    def to_flower(self) -> dict[str, Any]:
        """The flat run config this object was built from, with defaults filled in."""
        return flat_values(self, flat_settings(type(self)))

    def site_fingerprint(self) -> str:
        """A hash of what a site computes with: the run config's fingerprint that a site
        signs into every ledger record, and that the coordinator, which holds the same
        settings, checks."""
        return settings_hash(flat_values(self, flat_settings(SiteRunConfig)), SiteRunConfig.PLACEMENT_KEYS)


# (optimizer, sample-level DP-SGD) -> (batch size, learning rate) when the run sets 0.
# SGD's are the default and no-DP simulations' measured settings (docs/benchmarks.md:
# 0.93 at epsilon 8, 0.98 without DP), Adam with DP the transformer's; Adam without DP
# takes the usual 1e-3, not tuned here.
AUTO_LOCAL_TRAINING = {
    ("sgd", True): (256, 2.0),
    ("sgd", False): (32, 0.05),
    ("adam", True): (64, 0.03),
    ("adam", False): (32, 0.001),
}


def _with_local_training_defaults(training: TrainingConfig, dp_sgd: bool) -> TrainingConfig:
    batch_size, learning_rate = AUTO_LOCAL_TRAINING[(training.optimizer, dp_sgd)]
    return dataclasses.replace(
        training,
        batch_size=training.batch_size or batch_size,
        learning_rate=training.learning_rate or learning_rate,
    )


def validate_budget(epsilon: float, delta: float, source: str) -> None:
    """A DP budget is a finite epsilon > 0 (EPSILON_RANGE) and a delta strictly between 0 and 1."""
    EPSILON_RANGE.check(f"epsilon in {source}", epsilon)
    DELTA_RANGE.check(f"delta in {source}", delta)


def require_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """`value`, when it is one of `choices`."""
    options = tuple(choices)
    if value not in options:
        raise CohortInputError(f"unknown {name} '{value}'; choose one of: {', '.join(options)}")
    return value


def flat_settings(config: type) -> dict[str, tuple[str, str, type]]:
    """Map each flat setting name of a run config class to (section attribute, field name,
    type); '' is the class itself. A field with a default factory is a section.

    Flat names are the field names, except that DPConfig.enabled is the switch `dp`.
    """
    # functools.cache takes Hashable arguments, and mypy does not see a class as one.
    return _flat_settings(config)


@functools.cache
def _flat_settings(config: type) -> dict[str, tuple[str, str, type]]:
    names: dict[str, tuple[str, str, type]] = {}
    for top in dataclasses.fields(config):
        if top.default_factory is not dataclasses.MISSING:
            for inner in dataclasses.fields(top.default_factory()):
                flat = "dp" if (top.name, inner.name) == ("dp", "enabled") else inner.name
                names[flat] = (top.name, inner.name, type(inner.default))
        else:
            names[top.name] = ("", top.name, type(top.default))
    return names


def settings_hash(flat: Mapping[str, Any], placement: frozenset[str]) -> str:
    """SHA-256 of the settings that decide what is computed (flat names, as to_flower gives)."""
    experiment = {key: value for key, value in flat.items() if key.replace("-", "_") not in placement}
    return hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()


def flat_values(config: SiteRunConfig, settings: Mapping[str, tuple[str, str, type]]) -> dict[str, Any]:
    """The flat settings of `config` named in `settings` (flat_settings of it or of a base)."""
    flat: dict[str, Any] = {}
    for name, (section, attribute, _) in settings.items():
        value = getattr(getattr(config, section) if section else config, attribute)
        flat[name.replace("_", "-")] = str(value) if isinstance(value, StrEnum) else value
    return flat


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Flower and TOML hand over ints where floats are meant (epsilon = 8); accept them."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise CohortInputError(f"{name.replace('_', '-')} is {value!r}; use true or false")
    if issubclass(kind, StrEnum) and isinstance(value, str):
        return value
    if not isinstance(value, kind):
        raise CohortInputError(f"{name.replace('_', '-')} is {value!r}; it must be a {kind.__name__}")
    return value
