"""Flower's own aggregation strategies, one registry entry each: how Cohort builds it from
the run config, and what it can be combined with.

Configuration validates against these flags (server.run_config), never against lists of
names, so a strategy is added by adding its entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from common import protocol

if TYPE_CHECKING:
    from server.run_config import AggregationConfig, RunConfig

# The key of the weight the server assigns each accepted update (server.aggregation_weight),
# which every strategy weighs by instead of a count the site reports.
AGGREGATION_WEIGHT = "aggregation-weight"

# (run, sites present, the settings every strategy shares) -> the strategy
Builder = Callable[["RunConfig", int, dict[str, Any]], Strategy]


@dataclass(frozen=True)
class StrategySpec:
    """title: its name in messages, as its paper names it.
    build: the Flower strategy for a run (learning rates of FedOpt and q-FedAvg are the
        sites' local one).
    robust: it assumes up to byzantine-sites hostile sites and aggregates so that they
        cannot steer the model; byzantine-sites means nothing to any other strategy.
    plain_mean: its aggregate is the plain mean of the updates, so client-level DP's noise,
        scaled for m equal shares of the mean, covers it.
    needs_train_loss: it weighs sites by their training loss, which every reply must carry
        (a site's policy may withhold it).
    proximal: sites pull their update towards the global model (FedProx's mu), which each
        training message carries.
    secure_aggregation: it needs only the sum of the updates, so a collect stage that
        reveals nothing but that sum (server.collect) can feed it.
    sites_needed: the fewest training replies it aggregates with f hostile sites.
    selects_sites: it keeps krum-selected of the replies, which must be honest ones.
    """

    title: str
    build: Builder
    robust: bool = False
    plain_mean: bool = False
    needs_train_loss: bool = False
    proximal: bool = False
    secure_aggregation: bool = False
    sites_needed: Callable[[int], int] = lambda hostile: 1
    selects_sites: bool = False


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(
        "FedAvg", lambda run, sites, shared: FedAvg(**shared), plain_mean=True, secure_aggregation=True
    ),
    # FedProx aggregates as FedAvg; its proximal term is the sites'.
    "fedprox": StrategySpec(
        "FedProx",
        lambda run, sites, shared: FedProx(proximal_mu=run.aggregation.proximal_mu, **shared),
        plain_mean=True,
        proximal=True,
        secure_aggregation=True,
    ),
    "fedadam": StrategySpec(
        "FedAdam",
        lambda run, sites, shared: FedAdam(
            eta=run.aggregation.server_learning_rate, eta_l=run.training.learning_rate, **shared
        ),
        secure_aggregation=True,
    ),
    "fedyogi": StrategySpec(
        "FedYogi",
        lambda run, sites, shared: FedYogi(
            eta=run.aggregation.server_learning_rate, eta_l=run.training.learning_rate, **shared
        ),
        secure_aggregation=True,
    ),
    "fedavgm": StrategySpec(
        "FedAvgM",
        lambda run, sites, shared: FedAvgM(
            server_learning_rate=run.aggregation.server_learning_rate,
            server_momentum=run.aggregation.server_momentum,
            **shared,
        ),
        secure_aggregation=True,
    ),
    "fedmedian": StrategySpec("FedMedian", lambda run, sites, shared: FedMedian(**shared), robust=True),
    "fedtrimmedavg": StrategySpec(
        "FedTrimmedAvg",
        lambda run, sites, shared: FedTrimmedAvg(beta=run.aggregation.trimmed_beta, **shared),
        robust=True,
    ),
    # Blanchard et al. for Krum, El Mhamdi et al. for Bulyan (Flower's Bulyan refuses fewer).
    "krum": StrategySpec(
        "Krum",
        lambda run, sites, shared: Krum(num_malicious_nodes=run.aggregation.byzantine_sites, **shared),
        robust=True,
        sites_needed=lambda hostile: 2 * hostile + 3,
    ),
    "multikrum": StrategySpec(
        "MultiKrum",
        lambda run, sites, shared: MultiKrum(
            num_malicious_nodes=run.aggregation.byzantine_sites,
            num_nodes_to_select=run.aggregation.krum_selected or max(1, sites - run.aggregation.byzantine_sites),
            **shared,
        ),
        robust=True,
        sites_needed=lambda hostile: 2 * hostile + 3,
        selects_sites=True,
    ),
    "bulyan": StrategySpec(
        "Bulyan",
        lambda run, sites, shared: Bulyan(num_malicious_nodes=run.aggregation.byzantine_sites, **shared),
        robust=True,
        sites_needed=lambda hostile: 4 * hostile + 3,
    ),
    "qfedavg": StrategySpec(
        "q-FedAvg",
        lambda run, sites, shared: QFedAvg(
            client_learning_rate=run.training.learning_rate,
            q=run.aggregation.qfedavg_q,
            train_loss_key=protocol.TRAIN_LOSS,
            **shared,
        ),
        needs_train_loss=True,
    ),
}


def build_strategy(run: RunConfig, num_sites: int) -> Strategy:
    """Training samples fraction_train of the sites each round, validation
    fraction_evaluate of them (by default the same share).

    Updates are weighted by the weight the server assigned after its checks
    (server.aggregation_weight), never by a count the site reports.
    """
    aggregation = run.aggregation
    minimum = _minimum_sites(aggregation, num_sites)
    shared = {
        "fraction_train": aggregation.fraction_train,
        "fraction_evaluate": aggregation.evaluate_share,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum,
        "min_available_nodes": minimum,
        "weighted_by_key": AGGREGATION_WEIGHT,
    }
    return STRATEGIES[aggregation.strategy].build(run, num_sites, shared)


def sample_size(aggregation: AggregationConfig, num_sites: int) -> int:
    """How many sites Flower's strategies sample for training each round."""
    return max(int(num_sites * aggregation.fraction_train), _minimum_sites(aggregation, num_sites))


def _minimum_sites(aggregation: AggregationConfig, num_sites: int) -> int:
    """Capped at the sites present, so a 1-site simulation does not wait forever for a second."""
    return max(1, min(aggregation.min_sites, num_sites))
