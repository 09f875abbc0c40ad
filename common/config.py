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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Iterable, Mapping, TypeVar

from common.errors import CohortInputError
from common.privacy.mechanisms import DPLevel, MechanismSpec, mechanism_of

MODELS = ("cnn", "transformer")
# Opacus' ways of computing per-sample gradients that fit a site (each gives the clipped
# update of hooks; the training loop takes an empty Poisson batch's step itself, since ew
# and functorch fail on one). A run may also say 'auto': AUTO_GRAD_SAMPLE_MODE's.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# model -> the fastest mode for it: ew (PyTorch's expanded weights) beats hooks, functorch
# and ghost clipping for both models at the batch sizes Cohort uses (docs/benchmarks.md).
AUTO_GRAD_SAMPLE_MODE = {"cnn": "ew", "transformer": "ew"}
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
        the fastest mode for the model, AUTO_GRAD_SAMPLE_MODE: 'ew' for both, measured
        on one thread at batch 64 and 256 on 8x8 and 28x28 input, 9-27% less time a
        step than 'hooks' and faster than 'functorch' and 'ghost' in every case
        (benchmarks/dp_step_time.py, docs/benchmarks.md). 'ghost' (ghost clipping)
        fails on the transformer and is refused for it.
    client_clipping: 'fixed' C, or 'adaptive' (Andrew et al. 2021): C follows the
        target_clipped_quantile of update norms, learnt at rate clip_norm_lr from a
        noisy count of clipped updates (a site clipping its own update uses Flower's mod
        for the one or the other).
    """

    enabled: bool = True
    dp_level: DPLevel = DPLevel.SAMPLE
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    client_clipping: str = "fixed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dp_level", DPLevel(require_choice("dp-level", self.dp_level, tuple(DPLevel))))

    def validate(self) -> None:
        from common.privacy.accounting import accountant_names  # Opacus' registry: it loads PyTorch

        if self.noise_multiplier < 0:
            raise CohortInputError(
                f"noise-multiplier is {self.noise_multiplier}; use 0 to derive it from "
                "the site budget, or a positive value"
            )
        if self.clip_norm <= 0:
            raise CohortInputError(f"clip-norm is {self.clip_norm}; it must be > 0")
        require_choice("accountant", self.accountant, accountant_names())
        require_choice("grad-sample-mode", self.grad_sample_mode, ("auto", *GRAD_SAMPLE_MODES))
        require_choice("client-clipping", self.client_clipping, CLIENT_CLIPPINGS)

    @property
    def mechanism(self) -> MechanismSpec:
        return mechanism_of(self.enabled, self.dp_level)

    @property
    def client_level(self) -> bool:
        return self.mechanism.server_noise

    @property
    def sample_level(self) -> bool:
        return self.mechanism.site_noise


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each site.

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

    model: str = "cnn"
    rounds: int = 50
    local_epochs: int = 1
    batch_size: int = 0
    learning_rate: float = 0.0
    momentum: float = 0.9
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"

    def validate(self) -> None:
        require_choice("model", self.model, MODELS)
        require_choice("optimizer", self.optimizer, OPTIMIZERS)
        require_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        for name, value in (("rounds", self.rounds), ("local-epochs", self.local_epochs)):
            if value < 1:
                raise CohortInputError(f"{name} is {value}; it must be >= 1")
        if self.batch_size < 0:
            raise CohortInputError(f"batch-size is {self.batch_size}; use 0 for the default of the DP mode, or a positive size")
        if self.learning_rate < 0:
            raise CohortInputError(f"learning-rate is {self.learning_rate}; use 0 for the default of the DP mode, or a positive rate")


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

    study_epsilon: float = 0.0
    study_delta: float = 0.0

    def validate(self) -> None:
        if self.study_epsilon < 0:
            raise CohortInputError(f"study-epsilon is {self.study_epsilon}; ask for a positive epsilon, or 0 for all each site will grant")
        if not 0 <= self.study_delta < 1:
            raise CohortInputError(f"study-delta is {self.study_delta}; use 0 for each site's own delta, or a delta between 0 and 1 (e.g. 1e-5)")


Settings = TypeVar("Settings", bound="SiteRunConfig")


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
    site_epsilon: float = 8.0
    site_delta: float = 1e-5
    site_allow_non_private: bool = False
    noise_source: str = SECURE_NOISE

    def __post_init__(self) -> None:
        require_choice("device", self.device, DEVICES)
        require_choice("noise-source", self.noise_source, NOISE_SOURCES)
        self.training.validate()
        self.dp.validate()
        self.study.validate()
        object.__setattr__(self, "training", _with_local_training_defaults(self.training, self.dp.sample_level))
        if self.dp.grad_sample_mode == "auto":
            object.__setattr__(self, "dp", dataclasses.replace(self.dp, grad_sample_mode=AUTO_GRAD_SAMPLE_MODE[self.training.model]))
        if (self.training.model, self.dp.grad_sample_mode) == ("transformer", "ghost"):
            raise CohortInputError("Opacus' ghost clipping fails on the transformer; use auto, ew, hooks or functorch")
        validate_budget(self.site_epsilon, self.site_delta, source="site-epsilon/site-delta")

    @classmethod
    def from_flower(cls: type[Settings], run_config: Mapping[str, Any]) -> Settings:
        """A site's view of Flower's flat run config: its own keys; every other key is the
        coordinator's, and a site ignores it (docs/site.md)."""
        own = flat_settings(cls)
        return cls.from_settings({key: value for key, value in run_config.items() if key.replace("-", "_") in own})

    @classmethod
    def from_settings(cls: type[Settings], run_config: Mapping[str, Any]) -> Settings:
        """Build from flat settings that are all this class's own (keys as in pyproject's
        [tool.flwr.app.config])."""
        known = flat_settings(cls)
        sections: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            section, attribute, kind = known[key.replace("-", "_")]
            sections.setdefault(section, {})[attribute] = _coerce(key, value, kind)
        top = sections.pop("", {})
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls)}  # type: ignore[misc]
        return cls(**top, **{section: kinds[section](**values) for section, values in sections.items()})  # type: ignore[misc]

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
    """A DP budget is an epsilon > 0 and a delta strictly between 0 and 1."""
    if not epsilon > 0:
        raise CohortInputError(f"epsilon is {epsilon} in {source}; a privacy budget must be > 0")
    if not 0 < delta < 1:
        raise CohortInputError(f"delta is {delta} in {source}; it must be between 0 and 1 (e.g. 1e-5)")


def require_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """`value`, when it is one of `choices`."""
    options = tuple(choices)
    if value not in options:
        raise CohortInputError(f"unknown {name} '{value}'; choose one of: {', '.join(options)}")
    return value


@functools.cache
def flat_settings(config: type) -> dict[str, tuple[str, str, type]]:
    """Map each flat setting name of a run config class to (section attribute, field name,
    type); '' is the class itself. A field with a default factory is a section.

    Flat names are the field names, except that DPConfig.enabled is the switch `dp`.
    """
    names: dict[str, tuple[str, str, type]] = {}
    for top in dataclasses.fields(config):
        if top.default_factory is not dataclasses.MISSING:
            for inner in dataclasses.fields(top.default_factory()):  # type: ignore[arg-type]
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
        raise CohortInputError(
            f"{name.replace('_', '-')} is {value!r}; it must be a {kind.__name__}"
        )
    return value
