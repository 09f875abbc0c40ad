"""Models: Opacus-ready as built, identical on server and client, sized by the data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from common.config import GRAD_SAMPLE_MODES, UNSUPPORTED_GRAD_SAMPLE_MODES, SiteRunConfig
from common.errors import CohortInputError
from common.models import standardized_conv_grad_sample  # noqa: F401 (the rule Opacus' hooks use for the cnn)
from common.models.registry import MODEL_REGISTRY, build_model
from common.models.transformer import TokenTransformer
from common.models.weight_standardization import standardize


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 28, 28)])
def test_model_needs_no_opacus_fixes(name: str, input_shape: tuple[int, int, int]) -> None:
    assert ModuleValidator.validate(build_model(name, input_shape, 10), strict=False) == []


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_server_and_client_builds_have_identical_state_dict_keys(name: str) -> None:
    server_side = build_model(name, (1, 8, 8), 10).state_dict()
    client_side = build_model(name, (1, 8, 8), 10).state_dict()
    assert list(server_side) == list(client_side)
    assert all(server_side[k].shape == client_side[k].shape for k in server_side)


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_output_size_follows_the_class_count_of_the_data(name: str) -> None:
    model = build_model(name, (3, 16, 16), num_classes=7)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)


def _train_privately(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "hooks"
) -> list[float]:
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=32)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        noise_multiplier=0.3,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    losses = []
    for _ in range(15):
        for batch, targets in private_loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(private(batch), targets)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_model_learns_under_dp_sgd(name: str) -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (128,))
    images = torch.randn(128, 1, 8, 8) * 0.1 + labels.float().view(-1, 1, 1, 1)
    losses = _train_privately(build_model(name, (1, 8, 8), 2), images, labels)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_transformer_encoder_learns_token_sequences_under_dp_sgd() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (128,))
    tokens = torch.randint(2, 20, (128, 12))
    tokens[:, 0] = labels  # the first token gives the class away
    losses = _train_privately(TokenTransformer(vocab_size=20, max_length=12, num_classes=2), tokens, labels)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_unknown_model_is_refused_with_the_choices() -> None:
    with pytest.raises(CohortInputError, match=r"unknown model 'resnet'.*cnn, scatternet, transformer"):
        build_model("resnet", (1, 8, 8), 10)


def test_the_scatternets_wavelet_filters_are_not_in_the_arrays_it_exchanges() -> None:
    model = build_model("scatternet", (1, 28, 28), 10)
    assert list(model.state_dict()) == [name for name, _ in model.named_parameters()]


def test_scatternets_built_apart_with_the_same_weights_give_the_same_outputs() -> None:
    torch.manual_seed(4)
    coordinator, site = build_model("scatternet", (1, 28, 28), 10), build_model("scatternet", (1, 28, 28), 10)
    site.load_state_dict(coordinator.state_dict())
    images = torch.rand(4, 1, 28, 28)
    assert torch.equal(coordinator(images), site(images))


def test_images_too_small_for_the_cnn_are_refused() -> None:
    with pytest.raises(CohortInputError, match="too small"):
        build_model("cnn", (1, 2, 2), 10)


def _one_noiseless_dp_step(name: str, mode: str, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(name, tuple(images.shape[1:]), 10)
    criterion = torch.nn.CrossEntropyLoss()
    private = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=criterion,
        data_loader=DataLoader(TensorDataset(images, labels), batch_size=len(images)),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    wrapped, optimizer = private[0], private[1]
    loss_fn = private[2] if mode == "ghost" else criterion
    optimizer.zero_grad()
    loss_fn(wrapped(images), labels).backward()
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "name,mode",
    [(n, m) for n in sorted(MODEL_REGISTRY) for m in GRAD_SAMPLE_MODES if (n, m) not in UNSUPPORTED_GRAD_SAMPLE_MODES],
)
def test_every_offered_grad_sample_mode_clips_exactly_like_hooks(name: str, mode: str) -> None:
    torch.manual_seed(1)
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    other = _one_noiseless_dp_step(name, mode, images, labels)
    reference = _one_noiseless_dp_step(name, "hooks", images, labels)
    assert torch.allclose(other, reference, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_the_auto_grad_sample_mode_clips_28x28_images_exactly_like_functorch(name: str) -> None:
    # functorch differentiates each example's forward pass itself, so it checks the cnn's
    # auto mode (hooks, with Cohort's rule for the standardised convolutions) independently.
    torch.manual_seed(2)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    auto = SiteRunConfig.from_flower({"model": name}).dp.grad_sample_mode
    assert torch.allclose(
        _one_noiseless_dp_step(name, auto, images, labels),
        _one_noiseless_dp_step(name, "functorch", images, labels),
        atol=1e-6,
    )


def test_weight_standardised_filters_have_zero_mean_and_unit_variance() -> None:
    standard = standardize(torch.randn(16, 3, 3, 3) * 5 + 2).reshape(16, -1)
    assert torch.allclose(standard.mean(dim=1), torch.zeros(16), atol=1e-5)
    assert torch.allclose(standard.var(dim=1, unbiased=False), torch.ones(16), atol=1e-3)


def test_per_sample_gradients_of_the_cnn_are_each_examples_own_gradient() -> None:
    # Opacus' hooks use Cohort's rule for the weight-standardised convolutions.
    torch.manual_seed(3)
    model = build_model("cnn", (1, 8, 8), 10)
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    sampled = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(sampled(images), labels, reduction="sum").backward()
    per_sample = [p.grad_sample.clone() for p in model.parameters()]
    sampled._close()
    for index in range(len(images)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images[index : index + 1]), labels[index : index + 1]).backward()
        for samples, parameter in zip(per_sample, model.parameters(), strict=True):
            assert torch.allclose(samples[index], parameter.grad, atol=1e-5)


def test_building_a_model_does_not_load_opacus() -> None:
    """The coordinator and `cohort simulate`'s checks build models; Opacus (and SciPy with
    it) costs every such process about 4 s of its start."""
    probe = "import sys; from common.models.registry import build_model; build_model('cnn', (1, 8, 8), 10); "
    probe += "build_model('transformer', (1, 8, 8), 10); print('opacus' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "False", loaded.stdout + loaded.stderr
