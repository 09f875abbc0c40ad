"""Client-level DP without a trusted aggregator: the Skellam noise the sites add under
secure aggregation, the run's budget for it, and the server's signed ledger of its releases.

The server adds no noise and never sees an un-noised sum: each site adds its share before
masking (client/integer_update.py), sized by the plan (server/secure_aggregation_plan.py)
so that the fewest inputs a round may be unmasked with keep the budget. What the server
does is account: each release is the Skellam mechanism with the variance the contributing
sites actually added (common/privacy/skellam.py), composed over the run's releases, and
ledgered as today's central releases are, signed by the server's key in `server/` of the
run directory, with the contributing sites named in the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.common.logger import log

from common.privacy.ledger import LedgerRecord, Noise, Sampling, SiteLedger, Spender, iter_releases, model_hash
from common.privacy.mechanisms import Mechanism
from common.privacy.skellam import SkellamRelease, epsilon
from common.secure_aggregation.parameters import SecAggParameters
from server.central_dp import SERVER
from server.client_level_noise import NO_AMPLIFICATION
from server.run_config import RunConfig


@dataclass
class DistributedPrivacy:
    """The run's distributed client-level privacy: its budget and its ledger.

    `releases` is read from the server's ledger once (a resumed run keeps spending from where
    it stopped); the server is its only writer and keeps it in step on every release.
    """

    run: RunConfig
    parameters: SecAggParameters
    ledger: SiteLedger
    run_id: int
    releases: list[LedgerRecord]

    @classmethod
    def for_run(cls, run: RunConfig, run_dir: Path, parameters: SecAggParameters, run_id: int) -> DistributedPrivacy:
        privacy = cls(run, parameters, SiteLedger(run_dir / SERVER), run_id, [])
        privacy.releases = list(iter_releases(privacy.ledger.entries(), run.fingerprint()))
        log(
            INFO,
            "Distributed client-level DP: each site adds Skellam noise of variance "
            "%.4g; a round of at least %d inputs carries noise sigma %.4f",
            parameters.noise_variance,
            parameters.min_contributions,
            privacy.fewest().noise_multiplier,
        )
        return privacy

    def fewest(self) -> SkellamRelease:
        """The release of a round unmasked with the fewest inputs allowed: the least noise."""
        l2, l1 = self.parameters.sensitivity
        return SkellamRelease(self.parameters.min_contributions * self.parameters.noise_variance, l2, l1)

    def epsilon_after(self, more: list[SkellamRelease] | None = None) -> float:
        return epsilon(
            [SkellamRelease.from_details(r.mechanism_details) for r in self.releases] + (more or []),
            self.run.central_dp.client_delta,
        )

    def over_budget(self) -> str | None:
        """Why the next release may not happen (even a round with the fewest inputs allowed
        would exceed the budget), or None."""
        after = self.epsilon_after([self.fewest()])
        if after <= self.run.central_dp.client_epsilon:
            return None
        return (
            f"client-level budget reached: one more round would spend epsilon {after:.3f} of client-epsilon "
            f"{self.run.central_dp.client_epsilon:g}"
        )

    def record(
        self, server_round: int, arrays: ArrayRecord, noise_variance: float, sites: tuple[str, ...]
    ) -> tuple[float, SkellamRelease]:
        """Sign and append the round's release; returns the run's epsilon after it, and the release."""
        l2, l1 = self.parameters.sensitivity
        release = SkellamRelease(noise_variance, l2, l1)
        spent = self.epsilon_after([release])
        delta, budget = self.run.central_dp.client_delta, self.run.central_dp.client_epsilon
        spender = Spender(
            self.run_id, server_round, SERVER, delta, budget, self.run.fingerprint(), self.run.fingerprint()
        )
        noise = Noise(release.noise_multiplier, NO_AMPLIFICATION, Sampling.NONE, 1, self.parameters.clip_norm)
        record = LedgerRecord.release(
            spender,
            Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM,
            noise,
            spent,
            "rdp",
            model_hash(arrays),
            release.details(sites),
        )
        self.ledger.append(record)
        self.releases.append(record)
        return spent, release
