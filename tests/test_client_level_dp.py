"""Client-level DP (central DP-FedAvg): Flower's wrappers add the noise, the accounting
covers every noisy release of a round, and a real simulation ledgers and enforces the
run's client-level budget, and estimates its privacy from canary clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from audit.spending import audit
from common.config import DPConfig
from common.errors import CohortInputError
from common.privacy.accounting import PrivacyState
from common.privacy.ledger import load_public_key, read_entries, verify_chain
from server.central_dp import ServerSideAdaptiveClipping
from server.client_level_noise import client_level_noise
from server.run_config import AggregationConfig, CentralDPConfig, RunConfig
from server.rundir import RunDirectory

COHORT = str(Path(sys.executable).parent / "cohort")
CLIENT_LEVEL = Path(__file__).resolve().parents[1] / "simulations" / "client-level.toml"
CANARY_CLIENTS = 20


def test_fixed_clipping_accounts_exactly_the_noise_flower_adds() -> None:
    noise = client_level_noise(
        DPConfig(dp_level="client", noise_multiplier=1.3), CentralDPConfig(), rounds=10, sample_size=20
    )
    assert noise.accounted == noise.update == noise.flower == 1.3
    assert noise.clipped_count == 0.0


def test_adaptive_clipping_accounts_update_and_count_noise_as_one_mechanism() -> None:
    dp = DPConfig(dp_level="client", client_clipping="adaptive", noise_multiplier=2.0)
    noise = client_level_noise(dp, CentralDPConfig(clipped_count_stddev=5.0), rounds=10, sample_size=20)
    flower_count, flower_update = compute_adaptive_noise_params(noise.flower, 20, noise.clipped_count)
    assert flower_count == 5.0
    assert flower_update == pytest.approx(noise.update)
    assert (noise.update**-2 + noise.clipped_count**-2) ** -0.5 == pytest.approx(2.0)


def test_adaptive_clipping_adds_more_update_noise_than_flowers_centred_count_convention() -> None:
    dp = DPConfig(dp_level="client", client_clipping="adaptive", noise_multiplier=2.0)
    noise = client_level_noise(dp, CentralDPConfig(clipped_count_stddev=5.0), rounds=10, sample_size=20)
    _, flower_update_for_sigma = compute_adaptive_noise_params(2.0, 20, 5.0)
    assert noise.update > flower_update_for_sigma


def test_derived_noise_keeps_the_runs_rounds_within_client_epsilon() -> None:
    central = CentralDPConfig(client_epsilon=4.0, client_delta=1e-5)
    noise = client_level_noise(DPConfig(dp_level="client"), central, rounds=12, sample_size=10)
    epsilon = PrivacyState(noise.accounted, 1.0, "rdp", ((noise.accounted, 1.0, 12),)).epsilon(1e-5)
    assert 0.95 * 4.0 <= epsilon <= 4.0


def test_count_noise_that_would_spend_the_whole_budget_is_refused() -> None:
    dp = DPConfig(dp_level="client", client_clipping="adaptive", noise_multiplier=2.0)
    with pytest.raises(CohortInputError, match="clipped-count-stddev"):
        client_level_noise(dp, CentralDPConfig(clipped_count_stddev=1.5), rounds=10, sample_size=20)


def test_client_level_dp_refuses_aggregators_that_are_not_a_plain_mean() -> None:
    with pytest.raises(CohortInputError, match="plain mean"):
        RunConfig(aggregation=AggregationConfig(strategy="krum"), dp=DPConfig(dp_level="client"))


def _noise_std(strategy: DifferentialPrivacyServerSideAdaptiveClipping) -> float:
    zeros = ArrayRecord({"w": Array(np.zeros(200_000, dtype=np.float32))})
    return float(strategy._add_noise_to_aggregated_arrays(zeros).to_numpy_ndarrays()[0].std())


def test_adaptive_noise_is_scaled_to_the_norm_the_updates_were_clipped_to() -> None:
    strategy = ServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=1.0, num_sampled_clients=10, clipped_count_stddev=5.0
    )
    strategy.clipped_at, strategy.clipping_norm = 1.0, 0.5  # the norm shrank after clipping
    assert _noise_std(strategy) == pytest.approx(strategy.noise_multiplier * 1.0 / 10, rel=0.02)
    assert strategy.clipping_norm == 0.5


def test_flowers_own_adaptive_wrapper_noises_at_the_next_rounds_norm() -> None:
    """Why ServerSideAdaptiveClipping exists: Flower 1.42 scales the noise to the new norm."""
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=1.0, num_sampled_clients=10, clipped_count_stddev=5.0
    )
    strategy.clipping_norm = 0.5
    assert _noise_std(strategy) == pytest.approx(strategy.noise_multiplier * 0.5 / 10, rel=0.02)


@pytest.fixture(scope="module")
def budget_stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Adaptive clipping done by the clients, a budget that fits one round of two, and
    canary clients for the one-shot estimate."""
    runs = tmp_path_factory.mktemp("runs")
    settings = [
        "num-sites=4",
        "rounds=2",
        "local-epochs=1",
        "clipping-side=client",
        "noise-multiplier=1.0",
        "client-epsilon=6.0",
        f"audit-canary-clients={CANARY_CLIENTS}",
    ]
    command = [COHORT, "simulate", str(CLIENT_LEVEL), "--runs-dir", str(runs)]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}, check=False
    )
    (run_dir,) = list(runs.iterdir())
    return result, run_dir


@pytest.mark.usefixtures("no_leftover_processes")
def test_client_level_simulation_ledgers_its_release_signed_by_the_server(
    budget_stopped_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = budget_stopped_run
    entries = read_entries(run_dir / "server" / "privacy_ledger.jsonl")
    assert verify_chain(entries, load_public_key(run_dir / "server" / "ledger_key.pub.pem")) is None
    (record,) = [e.record for e in entries]
    assert (record.round, record.mechanism, record.sample_rate, record.noise_multiplier) == (
        1,
        "client-level-dp-fedavg",
        1.0,
        1.0,
    )
    summary = RunDirectory(run_dir).read_summary()
    assert summary is not None and summary.client_level_epsilon == pytest.approx(record.epsilon)


def test_client_level_run_stops_before_a_round_that_would_exceed_client_epsilon(
    budget_stopped_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, run_dir = budget_stopped_run
    summary = RunDirectory(run_dir).read_summary()
    assert result.returncode == 1 and "client-level budget reached" in result.stderr
    assert summary is not None and summary.rounds == 1 and "client-level budget reached" in summary.stop_reason
    (record,) = [e.record for e in read_entries(run_dir / "server" / "privacy_ledger.jsonl")]
    assert 0 < record.epsilon <= 6.0


def test_audit_of_a_client_level_run_verifies_the_servers_ledger_and_states_its_assumption(
    budget_stopped_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = budget_stopped_run
    audit = subprocess.run([COHORT, "audit", str(run_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert audit.returncode == 0, audit.stderr
    server = json.loads((run_dir / "audit.json").read_text())["sites"]["server"]
    assert server["chain"] == "verified"
    assert server["sampling"] == ["no amplification by sampling claimed: every release counts in full (q = 1)"]


def test_one_shot_estimate_is_reported_beside_the_servers_client_level_epsilon(
    budget_stopped_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = budget_stopped_run
    env = {**os.environ, "COLUMNS": "80"}
    command = [COHORT, "audit", "empirical", str(run_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    estimate = json.loads((run_dir / "one_shot_estimate.json").read_text())
    (record,) = [e.record for e in read_entries(run_dir / "server" / "privacy_ledger.jsonl")]
    assert estimate["accountant_epsilon"] == pytest.approx(record.epsilon)
    assert (estimate["inserted"], estimate["rounds"], estimate["unclipped"]) == (CANARY_CLIENTS, 1, 0)
    assert estimate["final_mean"] > 0 and estimate["epsilon_final"] > 0
    shown = " ".join(result.stdout.split())
    assert "client-level estimate (Andrew et al. 2024)" in shown
    assert f"the server ledger's client-level epsilon {record.epsilon:.3f}" in shown
    assert "is not: a lower bound with a confidence guarantee" in shown
    assert not [line for line in result.stdout.splitlines() if len(line) > 80 and " " in line]  # a path may not wrap
    command = [COHORT, "audit", str(run_dir)]
    summary = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert summary.returncode == 0, summary.stderr
    reported = json.loads((run_dir / "audit.json").read_text())["client_level_estimate"]
    assert reported["epsilon_final"] == estimate["epsilon_final"]
    assert f"client-level estimate: {reported['verdict']}" in " ".join(summary.stdout.split())
    assert "Client-level privacy estimate" in (run_dir / "audit.html").read_text()


def test_canary_clients_are_no_sites_and_spend_no_sites_budget(
    budget_stopped_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = budget_stopped_run
    sites = [f"site-{i}" for i in range(4)]
    summary = RunDirectory(run_dir).read_summary()
    assert summary is not None and sorted(summary.sites) == sites
    assert sorted(audit(run_dir)["sites"]) == sorted([*sites, "server"])
    canaries = run_dir / "federation" / "audit-canary-clients"
    assert len([entry for entry in canaries.iterdir() if (entry / "privacy_ledger.jsonl").is_file()]) == CANARY_CLIENTS
