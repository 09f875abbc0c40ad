"""Where DP noise comes from: the secure sampler is a normal distribution and never repeats,
the seeded one repeats exactly, the optimizer adds noise of the std the accounting
assumes in every grad-sample mode, and who decides which source a release uses."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from client.dp_randomness import PoissonBatches, ShuffledBatches, draw_noise_from, site_noise_source
from client.policy import SiteConfig
from client.training import noise_only_step, train_locally
from common.config import (
    AUTO_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    UNSUPPORTED_GRAD_SAMPLE_MODES,
    DPConfig,
    SiteRunConfig,
)
from common.models.registry import build_model
from common.privacy.accounting import PrivacyState
from common.privacy.noise import NoiseSource, SecureNoise, SeededNoise
from server.central_dp import ServerSideFixedClipping, coordinator_noise
from server.run_config import DataConfig, RunConfig
from simulations.federation import simulated_site_data
from simulations.plan import plan_from_values

# Statistical checks fail a correct sampler with probability below about 1e-6 each.
DRAWS = 1_000_000
REPO_ROOT = Path(__file__).resolve().parent.parent
Z = 5.0

SIMULATED = SiteConfig(
    name="site-0", epsilon=8.0, delta=1e-5, state_dir=Path("/unused"), partition_id=0, num_partitions=5
)
DEPLOYED = SiteConfig(name="hospital", epsilon=8.0, delta=1e-5, state_dir=Path("/unused"), data_path="/data")


@pytest.fixture(scope="module")
def secure_draws() -> np.ndarray:
    return SecureNoise().gaussian(DRAWS, 3.0).numpy() / 3.0


def test_secure_gaussian_has_the_mean_and_variance_of_its_std(secure_draws: np.ndarray) -> None:
    assert abs(secure_draws.mean()) < Z / np.sqrt(DRAWS)
    assert abs(secure_draws.var() - 1.0) < Z * np.sqrt(2 / DRAWS)


def test_secure_gaussian_has_the_higher_moments_of_a_normal(secure_draws: np.ndarray) -> None:
    assert abs(stats.skew(secure_draws)) < Z * np.sqrt(6 / DRAWS)
    assert abs(stats.kurtosis(secure_draws, fisher=False) - 3.0) < Z * np.sqrt(96 / DRAWS)
    assert abs(np.mean(secure_draws**6) - 15.0) < Z * np.sqrt((10395 - 15**2) / DRAWS)


def test_secure_gaussian_passes_a_kolmogorov_smirnov_test_against_the_normal(secure_draws: np.ndarray) -> None:
    assert stats.kstest(secure_draws, "norm").pvalue > 1e-6


def test_secure_uniforms_pass_a_kolmogorov_smirnov_test() -> None:
    assert stats.kstest(SecureNoise().uniform(200_000).numpy(), "uniform").pvalue > 1e-6


def test_secure_noise_never_repeats_across_draws() -> None:
    source = SecureNoise()
    first, second = source.gaussian(50_000, 1.0), source.gaussian(50_000, 1.0)
    assert len(np.intersect1d(first.numpy(), second.numpy())) == 0
    assert len(np.unique(first.numpy())) == 50_000


# Forked from a fresh interpreter: forking this test process, whose earlier tests left
# gRPC and PyTorch threads running, can deadlock the children on locks those threads held.
_FORKED_DRAWS = """
import multiprocessing
from common.privacy.noise import SecureNoise

def draw(source):
    return source.gaussian(1_000, 1.0).tolist()

if __name__ == "__main__":
    source = SecureNoise()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(draw, [source, source])
    draws = [*children, draw(source)]
    print(len(set().union(*map(set, draws))))
"""


def test_secure_noise_never_repeats_across_processes_forked_from_one_source(tmp_path: Path) -> None:
    script = tmp_path / "forked_draws.py"
    script.write_text(_FORKED_DRAWS)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 3 * 1_000


def test_seeded_noise_repeats_for_the_same_seed_site_and_round() -> None:
    first, second = SeededNoise(7, "site-0", 3), SeededNoise(7, "site-0", 3)
    assert torch.equal(first.gaussian(100, 2.0), second.gaussian(100, 2.0))
    assert torch.equal(first.uniform(100), second.uniform(100))


@pytest.mark.parametrize("other", [(8, "site-0", 3), (7, "site-1", 3), (7, "site-0", 4)])
def test_seeded_noise_differs_between_seeds_sites_and_rounds(other: tuple[int, str, int]) -> None:
    assert not torch.equal(SeededNoise(7, "site-0", 3).gaussian(100, 1.0), SeededNoise(*other).gaussian(100, 1.0))


def test_a_deployed_site_draws_secure_noise_whatever_the_run_asks() -> None:
    assert site_noise_source(SiteRunConfig(noise_source="seeded"), DEPLOYED, DATA, 1).name == "secure"


@pytest.mark.parametrize("kind", ["secure", "seeded"])
def test_a_simulated_site_draws_the_noise_the_run_asks_for(kind: str) -> None:
    assert site_noise_source(SiteRunConfig(noise_source=kind), SIMULATED, DATA, 1).name == kind


def test_simulations_default_to_seeded_noise_and_other_runs_to_secure() -> None:
    assert RunConfig().noise_source == "secure"
    assert plan_from_values({}).run.noise_source == "seeded"
    assert plan_from_values({"noise-source": "secure"}).run.noise_source == "secure"


def test_the_coordinator_draws_secure_noise_unless_the_run_asks_for_seeded() -> None:
    assert coordinator_noise(RunConfig())(1).name == "secure"
    seeded = coordinator_noise(RunConfig(noise_source="seeded"))
    assert torch.equal(seeded(2).gaussian(10, 1.0), seeded(2).gaussian(10, 1.0))


@pytest.mark.parametrize("source", [SecureNoise(), SeededNoise(1, "server", 1)], ids=["secure", "seeded"])
def test_client_level_noise_has_std_sigma_c_over_m_from_the_runs_source(source: NoiseSource) -> None:
    strategy = ServerSideFixedClipping(
        FedAvg(), noise_multiplier=2.0, clipping_norm=0.5, num_sampled_clients=10, noise_sources=lambda _round: source
    )
    zeros = ArrayRecord({"w": Array(np.zeros(200_000, dtype=np.float32)), "b": Array(np.zeros(3, dtype=np.float32))})
    noised = strategy._add_noise_to_aggregated_arrays(zeros).to_numpy_ndarrays()
    assert noised[0].dtype == np.float32 and noised[1].shape == (3,)
    assert noised[0].std() == pytest.approx(2.0 * 0.5 / 10, rel=0.01)


def test_poisson_batches_hold_each_example_with_the_sample_rate() -> None:
    labels = torch.arange(1_000)
    batches = list(PoissonBatches(labels.float(), labels, sample_rate=0.1, steps=200, source=SecureNoise()))
    sizes = np.array([len(batch_labels) for _, batch_labels in batches])
    assert len(batches) == 200 and abs(sizes.mean() - 100) < Z * np.sqrt(90 / 200)
    assert all(torch.equal(images.long(), batch_labels) for images, batch_labels in batches)


def test_shuffled_batches_cover_every_example_once_an_epoch() -> None:
    labels = torch.arange(103)
    batches = [
        batch_labels for _, batch_labels in ShuffledBatches(labels.float(), labels, batch_size=10, source=SecureNoise())
    ]
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(torch.cat(batches).tolist()) == list(range(103))


SIGMA, CLIP, BATCH = 2.0, 0.5, 16


def _private_step(mode: str, source: NoiseSource, sigma: float, empty: bool = False) -> torch.Tensor:
    """The gradient one DP-SGD step leaves (noised and scaled), on a fixed batch of 16."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10)
    images, labels = torch.randn(2 * BATCH, 1, 8, 8), torch.randint(0, 10, (2 * BATCH,))
    private = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        criterion=torch.nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(images, labels), batch_size=BATCH),
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    wrapped, optimizer = private[0], private[1]
    criterion = private[2] if mode == "ghost" else torch.nn.CrossEntropyLoss()
    draw_noise_from(optimizer, source)
    optimizer.zero_grad()
    if empty:
        noise_only_step(optimizer)
    else:
        criterion(wrapped(images[:BATCH]), labels[:BATCH]).backward()
        optimizer.step()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    wrapped._close()
    return gradient


@pytest.mark.parametrize("source", [SecureNoise(), SeededNoise(1, "site-0", 1)], ids=["secure", "seeded"])
@pytest.mark.parametrize("mode", [m for m in GRAD_SAMPLE_MODES if ("cnn", m) not in UNSUPPORTED_GRAD_SAMPLE_MODES])
def test_the_optimizer_adds_noise_of_std_sigma_c_over_the_batch_size(mode: str, source: NoiseSource) -> None:
    noise = _private_step(mode, source, SIGMA) - _private_step(mode, source, 0.0)
    assert noise.std().item() == pytest.approx(SIGMA * CLIP / BATCH, rel=0.05)  # 6,186 values: 1% standard error


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_poisson_batch_is_noise_of_std_sigma_c_over_the_batch_size(mode: str) -> None:
    noise = _private_step(mode, SecureNoise(), SIGMA, empty=True)
    assert noise.std().item() == pytest.approx(SIGMA * CLIP / BATCH, rel=0.05)


def test_the_optimizer_noise_comes_from_the_source() -> None:
    mode = AUTO_GRAD_SAMPLE_MODE["cnn"]
    assert torch.equal(
        _private_step(mode, SeededNoise(1, "a", 1), SIGMA), _private_step(mode, SeededNoise(1, "a", 1), SIGMA)
    )
    assert not torch.equal(_private_step(mode, SecureNoise(), SIGMA), _private_step(mode, SecureNoise(), SIGMA))


DATA = simulated_site_data(DataConfig(), 0, 5)


def _trained_weights(run: SiteRunConfig, source: NoiseSource) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model("cnn", DATA.train.input_shape, DATA.num_classes)
    privacy = (
        PrivacyState(1.0, 1 / -(-len(DATA.train) // run.training.batch_size), "rdp") if run.dp.sample_level else None
    )
    train_locally(model, DATA.train, run, privacy, torch.device("cpu"), source)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
def test_a_seeded_round_trains_to_the_same_weights_twice(dp: bool) -> None:
    run = SiteRunConfig(dp=DPConfig(enabled=dp))
    first, second = (_trained_weights(run, SeededNoise(42, "site-0", 1)) for _ in range(2))
    assert torch.equal(first, second)
    assert not torch.equal(first, _trained_weights(run, SeededNoise(42, "site-0", 2)))


def test_a_round_with_secure_noise_raises_no_secure_rng_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trained_weights(SiteRunConfig(), SecureNoise())
    assert not [w for w in caught if "Secure RNG" in str(w.message)]
