"""The coordinator's run configuration: the settings every site reads
(common.config.SiteRunConfig) and the coordinator's own, as one typed object validated once.

The coordinator owns everything here (it is the experiment), and it validates every key of
a run config, its sites' included, before anything runs: a misspelt key is refused naming
it. A site reads only the site-facing part and ignores the rest (docs/site.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.config import (
    DELTA_RANGE,
    EPSILON_RANGE,
    SiteRunConfig,
    check_ranges,
    flat_settings,
    flat_values,
    in_range,
    number,
    require_choice,
    settings_hash,
)
from common.errors import CohortInputError
from common.secure_aggregation.field import MAX_BITS
from common.secure_aggregation.parameters import MIN_BITS
from server.strategies import STRATEGIES

PARTITIONERS = ("iid", "dirichlet", "shards")
AGGREGATION_WEIGHTS = ("uniform", "examples")
CLIPPING_SIDES = ("server", "client")
CANARY_KINDS = ("dirac", "input")
AUDIT_OBSERVERS = ("transcript", "final-model")
# The fewest canary clients whose cosines a Gaussian is fitted to.
MIN_CANARY_CLIENTS = 10


@dataclass(frozen=True)
class DataConfig:
    """Which data the simulation uses, how it is split across simulated sites, and the
    server's held-out test set.

    dataset: a built-in name (digits, mnist-5k) or a path to an .npz, an MNIST IDX
        folder or a folder of images with one subfolder per class.
    partitioner: iid, dirichlet (label skew controlled by dirichlet_alpha) or shards
        (each site gets shards_per_site label-sorted shards).
    test_fraction: share held out for the server's central evaluation, when the data
        brings no test split of its own.
    val_fraction: share of each simulated site's data kept for local validation.
    seed: the test split, the partitions, each simulated site's split (seed + its
        partition id), the canaries and the global model's initial weights.
    audit_canaries: m, the number of canaries for the one-run empirical privacy audit
        (`cohort audit empirical`); 0 runs no audit. Each is a held-out image with a wrong
        label that the simulated site audit_canary_site trains on with probability 1/2.
    audit_canary_site: the partition id of the simulated site that holds the canaries.
    audit_canary_kind: 'dirac', gradient-space canaries (each a fixed coordinate of the
        model whose gradient is that coordinate's direction at the clip norm: the
        strongest white-box canary for DP-SGD), or 'input', the wrong-labelled images.
    audit_observer: what the audit scores the canaries on: 'transcript', the canary
        site's released update of every round, which the simulation's coordinator keeps
        for the audit (what a coordinator sees), or 'final-model', the final global model
        alone (what anyone given the model sees).
    audit_canary_clients: K, the canary clients of the one-shot estimate of client-level
        privacy (Andrew et al., ICLR 2024; `cohort audit empirical`), simulated after the
        real sites: each sends its own random direction at the clip norm whenever it is
        sampled (server.canary_clients); 0 runs no estimate. Client-level DP only; the
        estimate fits a Gaussian to their cosines, so at least MIN_CANARY_CLIENTS.
    """

    dataset: str = "digits"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = number(1.0, 0, 1e6, low_open=True)
    shards_per_site: int = number(2, 1, 10_000)
    test_fraction: float = number(0.2, 0, 1, low_open=True, high_open=True)
    val_fraction: float = number(0.1, 0, 1, low_open=True, high_open=True)
    seed: int = number(42, 0, 2**32 - 1)
    audit_canaries: int = number(0, 0, 100_000, note="0 runs no audit")
    audit_canary_site: int = number(0, 0, 100_000)
    audit_canary_kind: str = "dirac"
    audit_observer: str = "transcript"
    audit_canary_clients: int = number(0, 0, 100_000, note="0 runs no client-level estimate")

    def validate(self) -> None:
        require_choice("partitioner", self.partitioner, PARTITIONERS)
        require_choice("audit-canary-kind", self.audit_canary_kind, CANARY_KINDS)
        require_choice("audit-observer", self.audit_observer, AUDIT_OBSERVERS)
        check_ranges(self)
        if 0 < self.audit_canary_clients < MIN_CANARY_CLIENTS:
            raise CohortInputError(
                f"audit-canary-clients is {self.audit_canary_clients}; the estimate fits a Gaussian to the canary "
                f"clients' cosines and needs at least {MIN_CANARY_CLIENTS} (100 or more for a stable figure), or 0"
            )

    @property
    def keeps_transcript(self) -> bool:
        """Whether the coordinator keeps the canary site's update of every round for the audit."""
        return self.audit_canaries > 0 and self.audit_observer == "transcript"


@dataclass(frozen=True)
class AggregationConfig:
    """Which sites the server asks each round and how it aggregates their updates.

    strategy: one of Flower's strategies (server.strategies.STRATEGIES).
    fraction_train: share of the sites sampled to train each round.
    fraction_evaluate: share of the sites sampled each round to validate the global model
        on their own data; 0 takes fraction_train, so that validation never costs more
        than training, whatever the federation's size. The server's central evaluation on
        its held-out test set runs every round regardless.
    proximal_mu: FedProx's pull towards the global model, sent with each training message.
    qfedavg_q: q of q-FedAvg (Li et al., ICLR 2020): how much more a site with a higher
        training loss weighs; 0 is FedAvg. It reads each site's training loss.
    byzantine_sites: f, the hostile sites a robust strategy outvotes.
    krum_selected: how many sites MultiKrum keeps (0: all but f).
    """

    strategy: str = "fedavg"
    fraction_train: float = number(1.0, 0, 1, low_open=True)
    fraction_evaluate: float = number(0.0, 0, 1, note="0 takes fraction-train's share")
    min_sites: int = number(2, 1, 100_000)
    proximal_mu: float = number(0.01, 0, 1000)
    server_learning_rate: float = number(0.1, 0, 100, low_open=True)
    server_momentum: float = number(0.9, 0, 1, high_open=True)
    trimmed_beta: float = number(0.2, 0, 0.5, high_open=True, note="FedTrimmedAvg cuts that share off each end")
    qfedavg_q: float = number(0.1, 0, 100, note="0 is FedAvg")
    byzantine_sites: int = number(0, 0, 100_000)
    krum_selected: int = number(0, 0, 100_000, note="0 keeps all but byzantine-sites")

    def validate(self) -> None:
        require_choice("strategy", self.strategy, STRATEGIES)
        check_ranges(self)
        if self.byzantine_sites and not STRATEGIES[self.strategy].robust:
            robust = ", ".join(name for name, spec in STRATEGIES.items() if spec.robust)
            raise CohortInputError(
                f"byzantine-sites is {self.byzantine_sites}, but strategy {self.strategy} assumes no hostile sites; "
                f"choose one that outvotes them ({robust}) or set byzantine-sites = 0"
            )

    @property
    def evaluate_share(self) -> float:
        return self.fraction_evaluate or self.fraction_train


@dataclass(frozen=True)
class CentralDPConfig:
    """The server's part of client-level DP (dp-level = 'client').

    clipping_side: where updates are clipped, by the 'server' on arrival or by each
        'client' before sending (Flower's clipping mods); the noise is always the server's.
    target_clipped_quantile, clip_norm_lr: adaptive clipping's target quantile of update
        norms and learning rate (DPConfig.client_clipping = 'adaptive').
    clipped_count_stddev: the std of the noise on the count of clipped updates; 0 picks
        max(m/20, 2 sigma) for m sampled clients (Flower's default, raised so the count
        spends at most a quarter of the privacy).
    client_epsilon, client_delta: the run's client-level budget; the server stops before
        a round that would exceed it.
    """

    clipping_side: str = "server"
    target_clipped_quantile: float = number(0.5, 0, 1)
    clip_norm_lr: float = number(0.2, 0, 100, low_open=True)
    clipped_count_stddev: float = number(0.0, 0, 1e6, note="0 picks the default")
    client_epsilon: float = in_range(8.0, EPSILON_RANGE)
    client_delta: float = in_range(1e-5, DELTA_RANGE)

    def validate(self) -> None:
        require_choice("clipping-side", self.clipping_side, CLIPPING_SIDES)
        check_ranges(self)


# The L2 bound a site clips its update to under secure aggregation when the DP level sets
# none (sample-level DP, no DP). Its size costs no bits (the scale follows it) and only
# quantisation: each update is rounded by at most 0.1% of it in L2. Digits' DP-SGD updates
# measured 0.2 to 3.1 (docs/benchmarks.md), so it clips nothing there.
SECURE_AGGREGATION_CLIP = 10.0


@dataclass(frozen=True)
class SecureAggregationConfig:
    """The coordinator's parameters of secure aggregation (DPConfig.secure_aggregation turns
    it on); each round's sites receive them with its first message and check them.

    secure_aggregation_bits: b; masked inputs are vectors in Z/2^b. Checked before round 1:
        the sum of every sampled site's clipped update (and noise) must fit.
    secure_aggregation_neighbours: k, the sites each site shares its secrets with and masks
        against; 0 takes every other site up to 13 sites, then about 3 log2 n
        (common/secure_aggregation/parameters.py).
    secure_aggregation_threshold: t, the shares that rebuild a site's secrets; more than
        half of its k + 1 holders; 0 takes the smallest such majority.
    secure_aggregation_dropout: the share of a round's sites that may drop out with the
        round still unmasked: a round with fewer than n (1 - dropout) inputs is abandoned,
        and under distributed DP each site's noise is sized for that many.
    secure_aggregation_clip: the L2 bound each site clips its update to before masking (no
        one else can check it); 0 takes clip-norm at client level (the sensitivity the
        noise is sized for) and SECURE_AGGREGATION_CLIP otherwise.
    """

    secure_aggregation_bits: int = number(32, MIN_BITS, MAX_BITS)
    secure_aggregation_neighbours: int = number(0, 0, 100_000, note="0: the default")
    secure_aggregation_threshold: int = number(0, 0, 100_000, note="0: the default")
    secure_aggregation_dropout: float = number(
        0.2, 0, 1, high_open=True, note="the share of a round's sites that may drop"
    )
    secure_aggregation_clip: float = number(0.0, 0, 1e6, note="0: the DP level's default")

    def validate(self) -> None:
        check_ranges(self)


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
    example_cap: int = number(0, 0, 10**9, note="0 caps it at the round's median")
    update_norm_bound: float = number(0.0, 0, 1e9, note="0 picks the DP level's default")
    update_norm_factor: float = number(
        4.0, 1, 1e6, low_open=True, note="at 1 or below, honest sites above the median are rejected"
    )
    reply_timeout: float = number(0.0, 0, 7 * 86400, note="0 sizes it from the run")

    def validate(self) -> None:
        require_choice("aggregation-weight", self.aggregation_weight, AGGREGATION_WEIGHTS)
        check_ranges(self)


@dataclass(frozen=True)
class PretrainingConfig:
    """Training the initial global model on public data before round 1 (server.pretraining).

    pretrain_dataset: a public dataset, named as `dataset` is (a built-in name or a path),
        that the coordinator trains the initial model on without DP; '' starts from the
        seeded random initialisation. Never the sites' data: it gets no DP.
    pretrain_epochs: passes over it.
    """

    pretrain_dataset: str = ""
    pretrain_epochs: int = number(5, 1, 1000)

    def validate(self, data: DataConfig) -> None:
        check_ranges(self)
        if self.pretrain_dataset and self.pretrain_dataset == data.dataset:
            raise CohortInputError(
                f"pretrain-dataset is the run's own dataset '{data.dataset}'; pretraining gets no DP, so it takes "
                'public data only: name another dataset, or set pretrain-dataset = ""'
            )


@dataclass(frozen=True)
class RunConfig(SiteRunConfig):
    """Everything the coordinator decides for one run: what its sites read (SiteRunConfig's
    settings) and its own, validated once on construction.

    run_name: the prefix of the run directory's name.
    resume_from: a run directory to continue at the round after its newest checkpoint.
    site_book: the coordinator's site book (server.site_book), which holds every site to
        its registered name and its ledger key across runs; '' keeps it in the federation
        home, as a simulation does. `cohort run` sets the book of its connection.
    fairness_margin: the fairness report warns about a site whose accuracy falls more
        than this below the mean site's and whose 95% interval lies below that mean
        (simulations/fairness.py).
    pretraining: the initial model's training on public data (PretrainingConfig).
    """

    # Where a run lives, how it is resumed or reported: a run and its resumption may differ
    # in these without making the checkpoint foreign.
    PLACEMENT_KEYS: ClassVar[frozenset[str]] = SiteRunConfig.PLACEMENT_KEYS | {
        "run_name",
        "resume_from",
        "site_book",
        "fairness_margin",
        "reply_timeout",
    }

    run_name: str = "cohort"
    resume_from: str = ""
    site_book: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    secure: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)
    fairness_margin: float = number(0.05, 0, 1, note="an accuracy gap")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data.validate()
        self.aggregation.validate()
        self.central_dp.validate()
        self.secure.validate()
        self.checks.validate()
        self.pretraining.validate(self.data)
        strategy, mechanism = STRATEGIES[self.aggregation.strategy], self.dp.mechanism
        if mechanism.equal_shares and not strategy.plain_mean:
            plain = " or ".join(name for name, spec in STRATEGIES.items() if spec.plain_mean)
            raise CohortInputError(
                "client-level DP needs a plain mean of the updates; strategy "
                f"'{self.aggregation.strategy}' is not one; use {plain}"
            )
        if mechanism.equal_shares and self.checks.aggregation_weight != "uniform":
            raise CohortInputError(
                'client-level DP scales its noise for equal shares; set aggregation-weight = "uniform"'
            )
        if self.dp.secure_aggregation:
            self._refuse_what_needs_each_update()
        if self.data.audit_canary_clients:
            self._refuse_canary_clients_without_client_level()

    def _refuse_canary_clients_without_client_level(self) -> None:
        """Canary clients estimate client-level privacy: each sends its direction in the clear, as a client."""
        if self.dp.secure_aggregation:
            raise CohortInputError(
                "canary clients send their update in the clear, which secure aggregation does not let a client do; "
                "set secure-aggregation = false or audit-canary-clients = 0"
            )
        if not self.dp.client_level:
            raise CohortInputError(
                "audit-canary-clients estimates the privacy client-level DP gives a client, and this run has none; "
                'set dp = true and dp-level = "client" (at sample level, audit-canaries audits the sites)'
            )

    def _refuse_what_needs_each_update(self) -> None:
        """Secure aggregation shows the server only the sum: refuse every setting that
        needs a site's own update, naming the one to change."""
        strategy = STRATEGIES[self.aggregation.strategy]
        if not strategy.secure_aggregation:
            secure = ", ".join(name for name, spec in STRATEGIES.items() if spec.secure_aggregation)
            raise CohortInputError(
                f"strategy {strategy.title} needs each site's update, "
                f"which secure aggregation hides; use one of {secure}"
            )
        if self.checks.aggregation_weight != "uniform":
            raise CohortInputError(
                'secure aggregation sums updates in equal shares; set aggregation-weight = "uniform"'
            )
        if self.data.keeps_transcript:
            raise CohortInputError(
                "the audit's transcript observer scores the canary site's own updates, which secure aggregation "
                'hides; set audit-observer = "final-model"'
            )
        if self.checks.update_norm_bound > 0:
            raise CohortInputError(
                "the server cannot check each update's norm under secure aggregation; sites clip their own to "
                "secure-aggregation-clip: set update-norm-bound = 0"
            )
        if self.dp.client_level and self.dp.client_clipping != "fixed":
            raise CohortInputError(
                "adaptive clipping needs a count of clipped updates that secure aggregation hides; set client-clipping "
                '= "fixed"'
            )
        if self.dp.client_level and self.central_dp.clipping_side != "client":
            raise CohortInputError(
                "the server cannot clip updates it never sees; under secure aggregation the sites clip: set "
                'clipping-side = "client"'
            )
        if self.dp.client_level and self.secure.secure_aggregation_clip not in (0.0, self.dp.clip_norm):
            raise CohortInputError(
                "at client level the sites clip to clip-norm, the sensitivity the noise is sized for; set "
                "secure-aggregation-clip = 0"
            )

    @property
    def secure_aggregation_clip(self) -> float:
        """The L2 bound every site clips its update to under secure aggregation."""
        if self.dp.client_level:
            return self.dp.clip_norm
        return self.secure.secure_aggregation_clip or SECURE_AGGREGATION_CLIP

    @property
    def pretrains(self) -> bool:
        """Whether the ServerApp trains the initial model on public data: a resumed run loads
        its checkpoint instead."""
        return bool(self.pretraining.pretrain_dataset) and not self.resume_from

    def refuse_federation_size(self, sites: int) -> None:
        """Refuse a federation too small for the strategy, before any round starts."""
        aggregation, strategy = self.aggregation, STRATEGIES[self.aggregation.strategy]
        needed = strategy.sites_needed(aggregation.byzantine_sites)
        if sites < needed:
            raise CohortInputError(
                f"strategy {aggregation.strategy} with byzantine-sites={aggregation.byzantine_sites} needs "
                f"at least {needed} sites training each round, the run has {sites}; lower byzantine-sites or add sites"
            )
        if strategy.selects_sites and aggregation.krum_selected > sites - aggregation.byzantine_sites:
            raise CohortInputError(
                f"krum-selected is {aggregation.krum_selected}; {strategy.title} can select at most the "
                f"{sites - aggregation.byzantine_sites} sites that are not byzantine"
            )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run config, refusing any key Cohort does not know."""
        refuse_unknown_settings(run_config, run_settings())
        return cls.from_settings(run_config)

    def fingerprint(self) -> str:
        """A hash of what the run computes, so a checkpoint can refuse a foreign config."""
        return settings_hash(flat_values(self, flat_settings(RunConfig)), self.PLACEMENT_KEYS)


def run_settings() -> frozenset[str]:
    """Every run setting's name, as the run config spells it."""
    return frozenset(name.replace("_", "-") for name in flat_settings(RunConfig))


def refuse_unknown_settings(settings: Iterable[str], valid: Iterable[str]) -> None:
    """Name the first setting that is not one of `valid`, with the valid one closest to it
    (a typo in a key would otherwise reach Flower, which says only "Invalid run configuration")."""
    choices = sorted(valid)
    for name in sorted(set(settings) - set(choices)):
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "the settings are [tool.flwr.app.config] in pyproject.toml"
        raise CohortInputError(f"unknown setting '{name}'; {hint}")
