"""Client-level DP at the server: Flower's DP strategy wrappers, and the server's ledger.

Flower's wrappers clip and noise the updates; what they leave to the caller is what
makes the guarantee hold and visible: a release only when every sampled client sent an
update of equal weight (the noise is scaled for exactly m equal shares), a budget check
before each round, and a signed ledger record per release in the run directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from common.privacy.accounting import PrivacyState
from common.privacy.ledger import (
    LedgerRecord,
    Noise,
    Sampling,
    SiteLedger,
    Spender,
    history_of,
    iter_releases,
    model_hash,
)
from common.privacy.mechanisms import Mechanism
from common.privacy.noise import NoiseSource, SecureNoise, noise_source
from server.client_level_noise import NO_AMPLIFICATION, ClientLevelNoise, client_level_noise
from server.run_config import RunConfig

SERVER = "server"

# round -> the source of that round's noise
RoundNoise = Callable[[int], NoiseSource]


def _secure_every_round(server_round: int) -> NoiseSource:
    return SecureNoise()


def coordinator_noise(run: RunConfig) -> RoundNoise:
    """The run's noise-source for the coordinator's releases: secure unless the run asks for
    seeded noise (a simulation's default), seeded then by the run's seed and the round."""
    return lambda server_round: noise_source(run.noise_source, run.data.seed, SERVER, server_round)


def wrap_with_central_dp(
    strategy: Strategy,
    run: RunConfig,
    noise: ClientLevelNoise,
    sample_size: int,
    resume_clip_norm: float | None = None,
    noise_sources: RoundNoise = _secure_every_round,
) -> Strategy:
    """One of Flower's four wrappers: fixed or adaptive clipping, done by the server or the clients.

    resume_clip_norm: the adaptive norm a resumed run continues from (its last release's).
    noise_sources: where each round's noise comes from.
    """
    dp, central = run.dp, run.central_dp
    if dp.client_clipping == "fixed":
        fixed = ServerSideFixedClipping if central.clipping_side == "server" else ClientSideFixedClipping
        return fixed(
            strategy,
            noise_multiplier=noise.flower,
            clipping_norm=dp.clip_norm,
            num_sampled_clients=sample_size,
            noise_sources=noise_sources,
        )
    adaptive = ServerSideAdaptiveClipping if central.clipping_side == "server" else ClientSideAdaptiveClipping
    return adaptive(
        strategy,
        noise_multiplier=noise.flower,
        num_sampled_clients=sample_size,
        initial_clipping_norm=resume_clip_norm or dp.clip_norm,
        target_clipped_quantile=central.target_clipped_quantile,
        clip_norm_lr=central.clip_norm_lr,
        clipped_count_stddev=noise.clipped_count,
        noise_sources=noise_sources,
    )


class _SourcedNoise:
    """Noise from the run's noise source instead of Flower's np.random.normal (a Mersenne
    Twister: neither a CSPRNG nor seeded by the run). One source per round, so a seeded
    run's round r draws the same noise whether it ran straight through or was resumed.

    round_noise: the current round's source (the first round's until a round begins).
    """

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def __init__(self, *args: Any, noise_sources: RoundNoise = _secure_every_round, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_sources = noise_sources
        self.round_noise = noise_sources(1)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.round_noise = self.noise_sources(server_round)
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        arrays = aggregated.to_numpy_ndarrays()
        noise = self.round_noise.gaussian(sum(a.size for a in arrays), std).split([a.size for a in arrays])
        log(INFO, "aggregate_fit: central DP noise with %.4f stdev added (%s noise)", std, self.round_noise.name)
        return ArrayRecord(
            {
                name: Array(array + values.numpy().reshape(array.shape).astype(array.dtype))
                for name, array, values in zip(aggregated.keys(), arrays, noise, strict=True)
            }
        )


class _SourcedAdaptiveNoise(_SourcedNoise):
    """Adaptive clipping's noisy count of clipped updates from the same source: it is half
    of the round's Gaussian mechanism (server/client_level_noise.py)."""

    clipped_count_stddev: float

    def _noisy_fraction(self, count: int, total: int) -> float:
        return (count + float(self.round_noise.gaussian(1, self.clipped_count_stddev)[0])) / total


class ServerSideFixedClipping(_SourcedNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, noised from the run's source."""


class ClientSideFixedClipping(_SourcedNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping, noised from the run's source."""


class _NoiseAtClippedNorm:
    """Noise scaled to the norm the round's updates were clipped to.

    Flower 1.42's adaptive wrappers move the clipping norm to next round's value before
    they add this round's noise, so a shrinking norm adds less noise than the round's
    sensitivity needs and the guarantee quietly weakens. This mixin adds the noise at
    the norm used for clipping, which is the noise the accounting assumes.
    """

    clipping_norm: float
    clipped_at: float

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.clipped_at = self.clipping_norm
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        next_norm, self.clipping_norm = self.clipping_norm, self.clipped_at
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc]
        finally:
            self.clipping_norm = next_norm


class ServerSideAdaptiveClipping(
    _NoiseAtClippedNorm, _SourcedAdaptiveNoise, DifferentialPrivacyServerSideAdaptiveClipping
):
    """Flower's server-side adaptive clipping, noised at the norm it clipped to, from the run's source."""


class ClientSideAdaptiveClipping(
    _NoiseAtClippedNorm, _SourcedAdaptiveNoise, DifferentialPrivacyClientSideAdaptiveClipping
):
    """Flower's client-side adaptive clipping, noised at the norm the clients clipped to, from the run's source."""


def clipping_norm_of(strategy: Strategy) -> float:
    """The norm this round's updates were clipped to (under adaptive clipping, the one
    taken when the round was configured)."""
    if isinstance(strategy, _NoiseAtClippedNorm):
        return strategy.clipped_at
    return float(strategy.clipping_norm)  # type: ignore[attr-defined]


@dataclass
class CentralPrivacy:
    """The run's client-level privacy: its noise, its budget and its ledger.

    The ledger lives in the run directory under `server/`, signed by the server's own key;
    the run's releases compose under the run config's fingerprint, so a resumed run keeps
    spending from where it stopped. `releases` is read from the ledger once: the server is
    its only writer, and keeps it in step on every release.
    """

    run: RunConfig
    noise: ClientLevelNoise
    sample_size: int
    ledger: SiteLedger
    run_id: int
    releases: list[LedgerRecord]

    @classmethod
    def for_run(cls, run: RunConfig, run_dir: Path, sample_size: int, run_id: int) -> CentralPrivacy:
        noise = client_level_noise(run.dp, run.central_dp, run.training.rounds, sample_size)
        log(
            INFO,
            "Client-level DP: accounted sigma %.4f (update noise %.4f, clipped-count noise %.4f), %d clients per "
            "round, no sampling amplification",
            noise.accounted,
            noise.update,
            noise.clipped_count,
            sample_size,
        )
        ledger = SiteLedger(run_dir / SERVER)
        return cls(run, noise, sample_size, ledger, run_id, list(iter_releases(ledger.entries(), run.fingerprint())))

    def epsilon_after(self, more_rounds: int = 0) -> float:
        """The run's client-level epsilon once `more_rounds` further rounds are released."""
        history = (*history_of(self.releases), (self.noise.accounted, NO_AMPLIFICATION, more_rounds))
        return PrivacyState(self.noise.accounted, NO_AMPLIFICATION, self.run.dp.accountant, history).epsilon(
            self.run.central_dp.client_delta
        )

    def over_budget(self) -> str | None:
        """Why the next release may not happen, or None when the budget allows it."""
        after = self.epsilon_after(more_rounds=1)
        if after <= self.run.central_dp.client_epsilon:
            return None
        return (
            f"client-level budget reached: one more round would spend epsilon {after:.3f} of client-epsilon "
            f"{self.run.central_dp.client_epsilon:g}"
        )

    def incomplete(self, accepted: int) -> str | None:
        """Why a round with `accepted` checked updates may not be released, or None when
        all m sampled sites sent one (the server weighs them equally, RunConfig insists)."""
        if accepted != self.sample_size:
            return f"{accepted} update(s) passed the checks, the noise is scaled for {self.sample_size}"
        return None

    def record(self, server_round: int, arrays: ArrayRecord, clip_norm: float) -> float:
        """Sign and append the round's release; returns the run's epsilon after it."""
        epsilon = self.epsilon_after(more_rounds=1)
        spender = Spender(
            self.run_id,
            server_round,
            SERVER,
            self.run.central_dp.client_delta,
            self.run.central_dp.client_epsilon,
            self.run.fingerprint(),
            self.run.fingerprint(),
        )
        noise = Noise(self.noise.accounted, NO_AMPLIFICATION, Sampling.NONE, 1, clip_norm)
        record = LedgerRecord.release(
            spender, Mechanism.CLIENT_LEVEL_DP_FEDAVG, noise, epsilon, self.run.dp.accountant, model_hash(arrays)
        )
        self.ledger.append(record)
        self.releases.append(record)
        return epsilon

    def last_clip_norm(self) -> float | None:
        """The clipping norm of the newest release, which a resumed adaptive run starts from."""
        return self.releases[-1].clip_norm if self.releases else None
