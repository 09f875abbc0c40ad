"""The run configuration: one typed, validated object built from Flower's run config.

The coordinator owns everything here (it is the experiment). What belongs to a site,
its data and its privacy budget, lives in `common.site.SiteConfig` and is read from the
site's node config instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from common.errors import CohortInputError

MODELS = ("cnn", "transformer")
PARTITIONERS = ("iid", "dirichlet", "shards")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "qfedavg")
# Aggregators that assume some sites are hostile; each needs enough replies to outvote them.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
AGGREGATION_WEIGHTS = ("uniform", "examples")
ACCOUNTANTS = ("rdp", "prv", "gdp")
# Opacus' ways of computing per-sample gradients that fit a site (each gives the clipped
# update of hooks; the training loop takes an empty Poisson batch's step itself, since ew
# and functorch fail on one). A run may also say 'auto': AUTO_GRAD_SAMPLE_MODE's.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# model -> the fastest mode for it (docs/benchmarks.md): ew (PyTorch's expanded weights)
# beats hooks, functorch and ghost clipping for the transformer at the batch sizes Cohort
# uses; it cannot run the cnn's weight-standardised convolutions, for which Cohort
# registers a per-sample rule that hooks uses.
AUTO_GRAD_SAMPLE_MODE = {"cnn": "hooks", "transformer": "ew"}
# (model, mode) -> why that mode cannot train that model.
UNSUPPORTED_GRAD_SAMPLE_MODES = {
    ("transformer", "ghost"): "Opacus' ghost clipping fails on the transformer",
    ("cnn", "ew"): "PyTorch's expanded weights cannot differentiate the cnn's weight standardisation",
}
DEVICES = ("auto", "cpu", "cuda")
DP_LEVELS = ("sample", "client")
CLIENT_CLIPPINGS = ("fixed", "adaptive")
CLIPPING_SIDES = ("server", "client")
# Client-level DP bounds each client's share of the mean update by clip_norm / m; only
# strategies whose aggregate is that plain mean keep the bound (FedProx aggregates as FedAvg).
CLIENT_LEVEL_STRATEGIES = ("fedavg", "fedprox")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
# Where DP noise comes from (common/privacy/noise.py): a cipher's keystream, or a generator
# seeded by the run's seed. A deployed site always takes the secure one (client/dp_randomness.py).
SECURE_NOISE = "secure"
SEEDED_NOISE = "seeded"
NOISE_SOURCES = (SECURE_NOISE, SEEDED_NOISE)

# Settings that say where a run lives, how it is resumed or reported, or who could predict
# its noise, not what it computes: they may differ between a run and its resumption
# without making the checkpoint foreign.
_PLACEMENT_KEYS = frozenset({"run_name", "run_dir", "resume_from", "device", "federation_home", "fairness_margin", "reply_timeout", "noise_source"})
_SECTIONS = ("data", "training", "dp", "checks")


@dataclass(frozen=True)
class DPConfig:
    """The differential privacy of this run, chosen by the coordinator.

    enabled: train with DP; off only for a non-private baseline.
    dp_level: 'sample' protects every example with Opacus DP-SGD at each site (the
        sites' own budgets, cross-silo); 'client' protects every client's whole update
        with central DP-FedAvg through Flower's DP strategy wrappers (the server's
        budget for the run, cross-device).
    noise_multiplier: sigma, the Gaussian noise std in units of clip_norm. 0 derives it:
        at sample level each site from its own budget, at client level the server from
        client_epsilon over the run's rounds.
    clip_norm: C, the bound on every example's gradient (sample level) or on every
        client's update (client level; the starting value under adaptive clipping).
    accountant: the Opacus accountant used to derive sigma and enforce budgets.
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
        noisy count of clipped updates.
    clipping_side: where updates are clipped, by the 'server' on arrival or by each
        'client' before sending (Flower's clipping mods); the noise is always the server's.
    clipped_count_stddev: the std of the noise on that count; 0 picks max(m/20, 2 sigma)
        for m sampled clients (Flower's default, raised so the count spends at most a
        quarter of the privacy).
    client_epsilon, client_delta: the run's client-level budget; the server stops before
        a round that would exceed it.
    """

    enabled: bool = True
    dp_level: str = "sample"
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    client_clipping: str = "fixed"
    clipping_side: str = "server"
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = 0.0
    client_epsilon: float = 8.0
    client_delta: float = 1e-5

    def validate(self) -> None:
        if self.noise_multiplier < 0:
            raise CohortInputError(
                f"noise-multiplier is {self.noise_multiplier}; use 0 to derive it from "
                "the site budget, or a positive value"
            )
        if self.clip_norm <= 0:
            raise CohortInputError(f"clip-norm is {self.clip_norm}; it must be > 0")
        _require_choice("accountant", self.accountant, ACCOUNTANTS)
        _require_choice("grad-sample-mode", self.grad_sample_mode, ("auto", *GRAD_SAMPLE_MODES))
        _require_choice("dp-level", self.dp_level, DP_LEVELS)
        _require_choice("client-clipping", self.client_clipping, CLIENT_CLIPPINGS)
        _require_choice("clipping-side", self.clipping_side, CLIPPING_SIDES)
        if not 0 <= self.target_clipped_quantile <= 1:
            raise CohortInputError(f"target-clipped-quantile is {self.target_clipped_quantile}; it must be in [0, 1]")
        if self.clip_norm_lr <= 0:
            raise CohortInputError(f"clip-norm-lr is {self.clip_norm_lr}; it must be > 0")
        if self.clipped_count_stddev < 0:
            raise CohortInputError(f"clipped-count-stddev is {self.clipped_count_stddev}; use 0 for the default, or a positive value")
        validate_budget(self.client_epsilon, self.client_delta, source="client-epsilon/client-delta")

    @property
    def client_level(self) -> bool:
        return self.enabled and self.dp_level == "client"

    @property
    def sample_level(self) -> bool:
        return self.enabled and self.dp_level == "sample"


@dataclass(frozen=True)
class DataConfig:
    """Which data the simulation uses and how it is split across simulated sites.

    dataset: a built-in name (digits, mnist-5k) or a path to an .npz, an MNIST IDX
        folder or a folder of images with one subfolder per class.
    partitioner: iid, dirichlet (label skew controlled by dirichlet_alpha) or shards
        (each site gets shards_per_site label-sorted shards).
    test_fraction: share held out for the server's central evaluation, when the data
        brings no test split of its own.
    val_fraction: share of each site's data kept for local validation.
    audit_canaries: m, the number of canaries for the one-run empirical privacy audit
        (`cohort audit empirical`); 0 runs no audit. Each is a held-out image with a wrong
        label that the simulated site audit_canary_site trains on with probability 1/2.
    audit_canary_site: the partition id of the simulated site that holds the canaries.
    """

    dataset: str = "digits"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 1.0
    shards_per_site: int = 2
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    seed: int = 42
    audit_canaries: int = 0
    audit_canary_site: int = 0

    def validate(self) -> None:
        _require_choice("partitioner", self.partitioner, PARTITIONERS)
        if self.dirichlet_alpha <= 0:
            raise CohortInputError(f"dirichlet-alpha is {self.dirichlet_alpha}; it must be > 0")
        if self.shards_per_site < 1:
            raise CohortInputError(f"shards-per-site is {self.shards_per_site}; it must be >= 1")
        if self.audit_canaries < 0 or self.audit_canary_site < 0:
            raise CohortInputError("audit-canaries and audit-canary-site must be >= 0 (audit-canaries = 0: no audit)")
        for name, value in (("test-fraction", self.test_fraction), ("val-fraction", self.val_fraction)):
            if not 0 < value < 1:
                raise CohortInputError(f"{name} is {value}; it must be between 0 and 1")


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each site and aggregation at the server.

    optimizer: the local optimizer, fresh every round: 'sgd' (with momentum) or 'adam'
        (what transformers need); under DP, Opacus wraps either.
    batch_size, learning_rate: 0 picks what trains well for the optimizer and whether the
        sites train with DP-SGD (AUTO_LOCAL_TRAINING): clipped, noised gradients want large
        batches and a large rate, plain ones small batches and a small rate, so a user who
        switches DP off or on with one setting still gets a model that learns.
    lr_schedule: 'constant', or 'cosine' decay of the local rate over the rounds (to a
        tenth of learning_rate in the last round).
    qfedavg_q: q of q-FedAvg (Li et al., ICLR 2020): how much more a site with a higher
        training loss weighs; 0 is FedAvg. It reads each site's training loss.
    fraction_train: share of the sites sampled to train each round.
    fraction_evaluate: share of the sites sampled each round to validate the global model
        on their own data; 0 takes fraction_train, so that validation never costs more
        than training, whatever the federation's size. The server's central evaluation on
        its held-out test set runs every round regardless.
    """

    model: str = "cnn"
    rounds: int = 50
    local_epochs: int = 1
    batch_size: int = 0
    learning_rate: float = 0.0
    momentum: float = 0.9
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_sites: int = 2
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.1
    server_momentum: float = 0.9
    trimmed_beta: float = 0.2
    qfedavg_q: float = 0.1
    byzantine_sites: int = 0
    krum_selected: int = 0

    def validate(self) -> None:
        _require_choice("model", self.model, MODELS)
        _require_choice("strategy", self.strategy, STRATEGIES)
        _require_choice("optimizer", self.optimizer, OPTIMIZERS)
        _require_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        for name, value in (
            ("rounds", self.rounds),
            ("local-epochs", self.local_epochs),
            ("min-sites", self.min_sites),
        ):
            if value < 1:
                raise CohortInputError(f"{name} is {value}; it must be >= 1")
        if self.batch_size < 0:
            raise CohortInputError(f"batch-size is {self.batch_size}; use 0 for the default of the DP mode, or a positive size")
        if self.learning_rate < 0:
            raise CohortInputError(f"learning-rate is {self.learning_rate}; use 0 for the default of the DP mode, or a positive rate")
        if not 0 < self.fraction_train <= 1:
            raise CohortInputError(f"fraction-train is {self.fraction_train}; it must be in (0, 1]")
        if not 0 <= self.fraction_evaluate <= 1:
            raise CohortInputError(f"fraction-evaluate is {self.fraction_evaluate}; it must be in (0, 1], or 0 for fraction-train's share")
        if self.qfedavg_q < 0:
            raise CohortInputError(f"qfedavg-q is {self.qfedavg_q}; it must be >= 0 (0 is FedAvg)")
        if not 0 <= self.trimmed_beta < 0.5:
            raise CohortInputError(f"trimmed-beta is {self.trimmed_beta}; FedTrimmedAvg cuts that share off each end, so it must be in [0, 0.5)")
        if self.byzantine_sites < 0 or self.krum_selected < 0:
            raise CohortInputError("byzantine-sites and krum-selected must be >= 0")

    @property
    def evaluate_share(self) -> float:
        return self.fraction_evaluate or self.fraction_train

    def sites_needed(self) -> int:
        """The fewest training replies the strategy can aggregate with byzantine_sites hostile
        (Blanchard et al. for Krum, El Mhamdi et al. for Bulyan; Flower's Bulyan refuses fewer)."""
        hostile = self.byzantine_sites
        if self.strategy == "bulyan":
            return 4 * hostile + 3
        if self.strategy in ("krum", "multikrum"):
            return 2 * hostile + 3
        return 1


@dataclass(frozen=True)
class ChecksConfig:
    """How the server receives replies: what it accepts and how much each one weighs.

    aggregation_weight: 'uniform' (every accepted update counts the same) or 'examples'
        (the example count the site reports, capped at example_cap).
    example_cap: the largest example count one site is credited with; 0 caps it at the
        round's median reported count, so no single site can outweigh the others.
    update_norm_bound: the largest L2 norm of (update - global model) accepted; 0 picks
        the default of the run's DP level (see server.dp_policy).
    update_norm_factor: that default under sample-level DP or no DP: this multiple of the
        round's median update norm.
    reply_timeout: seconds the server waits for the replies of one exchange; 0 sizes it
        from the run: 600 s for the first exchange, then 4x the slowest so far (>= 60 s).
    """

    aggregation_weight: str = "uniform"
    example_cap: int = 0
    update_norm_bound: float = 0.0
    update_norm_factor: float = 4.0
    reply_timeout: float = 0.0

    def validate(self) -> None:
        _require_choice("aggregation-weight", self.aggregation_weight, AGGREGATION_WEIGHTS)
        if self.example_cap < 0:
            raise CohortInputError(f"example-cap is {self.example_cap}; use 0 for the round's median, or a positive count")
        if self.update_norm_bound < 0:
            raise CohortInputError(f"update-norm-bound is {self.update_norm_bound}; use 0 for the DP level's default, or a positive norm")
        if self.update_norm_factor <= 1:
            raise CohortInputError(f"update-norm-factor is {self.update_norm_factor}; it must be > 1 or honest sites above the median are rejected")
        if self.reply_timeout < 0:
            raise CohortInputError(f"reply-timeout is {self.reply_timeout}; use 0 to size it from the run, or a positive number of seconds")


@dataclass(frozen=True)
class RunConfig:
    """Everything the coordinator decides for one run, validated once on construction.

    run_name: the prefix of the run directory's name.
    run_dir: where the run writes; '' means runs/<run_name>-<timestamp>.
    resume_from: a run directory to continue at the round after its newest checkpoint.
    device: where sites train: 'auto' takes CUDA when visible.
    federation_home: where simulated sites keep their state (ledger, key, policy), one
        folder per site; sites spend from the same budget in every run that shares it.
    site_epsilon, site_delta, site_allow_non_private: the policy of a simulated site that
        sets none itself (a site's own policy always wins; see common.site).
    fairness_margin: the fairness report warns about a site whose accuracy falls more
        than this below the mean site's and whose 95% interval lies below that mean
        (simulations/fairness.py).
    noise_source: where the DP noise of simulated sites and of the coordinator (under
        client-level DP) comes from: 'secure' (a CSPRNG, never seeded; the default, so a
        deployed coordinator gets it) or 'seeded' (from the run's seed, the site and the
        round, so the same seed gives the same run; `cohort simulate` defaults to it). A
        deployed site always draws secure noise, whatever this says.
    """

    run_name: str = "cohort"
    run_dir: str = ""
    resume_from: str = ""
    device: str = "auto"
    federation_home: str = "runs/federation"
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    site_epsilon: float = 8.0
    site_delta: float = 1e-5
    site_allow_non_private: bool = False
    fairness_margin: float = 0.05
    noise_source: str = SECURE_NOISE

    def __post_init__(self) -> None:
        _require_choice("device", self.device, DEVICES)
        _require_choice("noise-source", self.noise_source, NOISE_SOURCES)
        self.data.validate()
        self.training.validate()
        self.dp.validate()
        object.__setattr__(self, "training", _with_local_training_defaults(self.training, self.dp.sample_level))
        if self.dp.grad_sample_mode == "auto":
            object.__setattr__(self, "dp", dataclasses.replace(self.dp, grad_sample_mode=AUTO_GRAD_SAMPLE_MODE[self.training.model]))
        self.checks.validate()
        unsupported = UNSUPPORTED_GRAD_SAMPLE_MODES.get((self.training.model, self.dp.grad_sample_mode))
        if unsupported:
            usable = [m for m in ("auto", *GRAD_SAMPLE_MODES) if (self.training.model, m) not in UNSUPPORTED_GRAD_SAMPLE_MODES]
            raise CohortInputError(f"{unsupported}; use {', '.join(usable[:-1])} or {usable[-1]}")
        if self.dp.client_level and self.training.strategy not in CLIENT_LEVEL_STRATEGIES:
            raise CohortInputError(
                f"client-level DP needs a plain mean of the updates; strategy '{self.training.strategy}' "
                f"is not one; use {' or '.join(CLIENT_LEVEL_STRATEGIES)}"
            )
        if self.dp.client_level and self.checks.aggregation_weight != "uniform":
            raise CohortInputError("client-level DP scales its noise for equal shares; set aggregation-weight = \"uniform\"")
        validate_budget(self.site_epsilon, self.site_delta, source="site-epsilon/site-delta")
        if not 0 <= self.fairness_margin <= 1:
            raise CohortInputError(f"fairness-margin is {self.fairness_margin}; it is an accuracy gap, between 0 and 1")

    def refuse_federation_size(self, sites: int) -> None:
        """Refuse a federation too small for the strategy, before any round starts."""
        needed = self.training.sites_needed()
        if sites < needed:
            raise CohortInputError(
                f"strategy {self.training.strategy} with byzantine-sites={self.training.byzantine_sites} needs "
                f"at least {needed} sites training each round, the run has {sites}; lower byzantine-sites or add sites"
            )
        if self.training.strategy == "multikrum" and self.training.krum_selected > sites - self.training.byzantine_sites:
            raise CohortInputError(
                f"krum-selected is {self.training.krum_selected}; MultiKrum can select at most the "
                f"{sites - self.training.byzantine_sites} sites that are not byzantine"
            )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run config (keys as in pyproject's [tool.flwr.app.config])."""
        refuse_unknown_settings(run_config, run_settings())
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        known = _flat_field_names()
        sections: dict[str, dict[str, Any]] = {"data": {}, "training": {}, "dp": {}, "checks": {}, "": {}}
        for name, value in values.items():
            section, attribute, kind = known[name]
            sections[section][attribute] = _coerce(name, value, kind)
        return cls(
            data=DataConfig(**sections["data"]),
            training=TrainingConfig(**sections["training"]),
            dp=DPConfig(**sections["dp"]),
            checks=ChecksConfig(**sections["checks"]),
            **sections[""],
        )

    def to_flower(self) -> dict[str, Any]:
        """The flat run config this object was built from, with defaults filled in."""
        flat: dict[str, Any] = {}
        for name, (section, attribute, _) in _flat_field_names().items():
            owner = getattr(self, section) if section else self
            flat[name.replace("_", "-")] = getattr(owner, attribute)
        return flat

    def fingerprint(self) -> str:
        """A hash of what the run computes, so a checkpoint can refuse a foreign config."""
        experiment = {k: v for k, v in self.to_flower().items() if k.replace("-", "_") not in _PLACEMENT_KEYS}
        return hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()


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


def run_settings() -> frozenset[str]:
    """Every run setting's name, as the run config spells it."""
    return frozenset(name.replace("_", "-") for name in _flat_field_names())


def refuse_unknown_settings(settings: Iterable[str], valid: Iterable[str]) -> None:
    """Name the first setting that is not one of `valid`, with the valid one closest to it
    (a typo in a key would otherwise reach Flower, which says only "Invalid run configuration")."""
    choices = sorted(valid)
    for name in sorted(set(settings) - set(choices)):
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "the settings are [tool.flwr.app.config] in pyproject.toml"
        raise CohortInputError(f"unknown setting '{name}'; {hint}")


def validate_budget(epsilon: float, delta: float, source: str) -> None:
    """A DP budget is an epsilon > 0 and a delta strictly between 0 and 1."""
    if not epsilon > 0:
        raise CohortInputError(f"epsilon is {epsilon} in {source}; a privacy budget must be > 0")
    if not 0 < delta < 1:
        raise CohortInputError(f"delta is {delta} in {source}; it must be between 0 and 1 (e.g. 1e-5)")


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CohortInputError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")


@functools.cache
def _flat_field_names() -> dict[str, tuple[str, str, type]]:
    """Map each flat setting name to (section attribute, field name, type).

    Flat names are the field names, except that DPConfig.enabled is the switch `dp`.
    """
    names: dict[str, tuple[str, str, type]] = {}
    for top in dataclasses.fields(RunConfig):
        if top.name in _SECTIONS:
            for inner in dataclasses.fields(top.default_factory()):  # type: ignore[misc]
                flat = "dp" if (top.name, inner.name) == ("dp", "enabled") else inner.name
                names[flat] = (top.name, inner.name, type(inner.default))
        else:
            names[top.name] = ("", top.name, type(top.default))
    return names


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Flower and TOML hand over ints where floats are meant (epsilon = 8); accept them."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise CohortInputError(f"{name.replace('_', '-')} is {value!r}; use true or false")
    if not isinstance(value, kind):
        raise CohortInputError(
            f"{name.replace('_', '-')} is {value!r}; it must be a {kind.__name__}"
        )
    return value
