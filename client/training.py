"""Local training at a site: Opacus DP-SGD with Poisson sampling, or plain SGD for a
non-private baseline. One fresh model and optimizer per round, so nothing (hooks,
wrappers, memory) accumulates across rounds."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp_randomness import Batch, PoissonBatches, ShuffledBatches, draw_noise_from
from client.gradient_canaries import GradientCanaries
from common.config import SECURE_NOISE, SiteRunConfig, TrainingConfig
from common.data.dataset import LabeledImages
from common.models import standardized_conv_grad_sample  # noqa: F401 (registers the rule Opacus' hooks use for the cnn)
from common.privacy.accounting import PrivacyState, restore_accountant
from common.privacy.noise import NoiseSource


@dataclass(frozen=True)
class LocalUpdate:
    """The outcome of one round of local training."""

    num_examples: int
    train_loss: float
    train_accuracy: float
    steps: int
    privacy: PrivacyState | None


class RoundOverTime(Exception):
    """Training passed the round's deadline (the site's max-round-seconds); nothing of the
    round may be released."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"stopped after {steps} steps")
        self.steps = steps


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Opacus' Poisson loader has as many steps as the plain loader: ceil(N / B)."""
    return -(-num_examples // batch_size)


def round_learning_rate(training: TrainingConfig, server_round: int) -> float:
    """The local learning rate of a round: constant, or cosine-decayed over the run.

    Decay matters under DP: late rounds then take smaller noisy steps, so the final model
    sits closer to where the noisy trajectory was heading.
    """
    if training.lr_schedule == "constant" or training.rounds == 1:
        return training.learning_rate
    progress = (min(server_round, training.rounds) - 1) / (training.rounds - 1)
    floor = 0.1
    return training.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_locally(
    model: nn.Module,
    data: LabeledImages,
    run: SiteRunConfig,
    privacy: PrivacyState | None,
    device: torch.device,
    noise: NoiseSource,
    server_round: int = 1,
    proximal_mu: float = 0.0,
    deadline: float = math.inf,
    canaries: GradientCanaries | None = None,
) -> LocalUpdate:
    """Train `model` in place for run.training.local_epochs epochs.

    With `privacy` given, the Opacus accountant starts from its history, so the epsilon
    it reports afterwards covers every earlier round too. Every random draw of the round
    (the batches, the audit's gradient `canaries` joining them, and under DP the noise)
    comes from `noise`. Raises RoundOverTime when a step ends after `deadline`
    (time.monotonic()).
    """
    model.to(device).train()
    global_weights = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    learning_rate = round_learning_rate(run.training, server_round)
    optimizer = _local_optimizer(model, run.training, learning_rate)
    criterion: nn.Module = nn.CrossEntropyLoss()
    engine = None
    trained: nn.Module = model
    batches: Iterable[Batch] = ShuffledBatches(images, labels, run.training.batch_size, noise)
    if privacy is not None:
        engine, trained, optimizer, criterion, batches = _dp_sgd(
            model, optimizer, criterion, images, labels, run, privacy, noise
        )
    join = None
    if canaries is not None:  # each joins a step at the rate an example does: 1 / steps per epoch
        rate = 1 / steps_per_epoch(len(data), run.training.batch_size)
        parameters = [p for p in trained.parameters() if p.requires_grad]
        join = partial(canaries.join, parameters, noise, rate, per_sample=privacy is not None)
    try:
        with warnings.catch_warnings():
            # Opacus reads each layer's output gradient in a full backward hook. The first
            # layer's input (the images) needs no gradient, so PyTorch fires that hook on the
            # output's gradient, which is what Opacus reads, and warns on every backward pass.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            loss_sum, correct, seen, steps = _run_epochs(
                trained,
                optimizer,
                criterion,
                batches,
                run.training.local_epochs,
                device,
                global_weights,
                proximal_mu,
                learning_rate,
                deadline,
                join,
            )
    finally:
        if isinstance(trained, AbstractGradSampleModule):
            trained._close()  # removes Opacus' hooks so the plain module is clean again
    return LocalUpdate(
        num_examples=len(data),
        train_loss=loss_sum / max(seen, 1),
        train_accuracy=correct / max(seen, 1),
        steps=steps,
        privacy=privacy.after(engine.accountant) if engine is not None and privacy is not None else None,
    )


def _dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    run: SiteRunConfig,
    privacy: PrivacyState,
    noise: NoiseSource,
) -> tuple[PrivacyEngine, nn.Module, DPOptimizer, nn.Module, PoissonBatches]:
    """Opacus' DP-SGD from `privacy`'s accountant history, drawing its batches and noise from `noise`."""
    with warnings.catch_warnings():
        if noise.name == SECURE_NOISE:
            # Opacus warns that its secure mode is off; neither its noise nor its sampling
            # is used: both come from the secure source (draw_noise_from, PoissonBatches).
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=privacy.accountant)
    engine.accountant = restore_accountant(privacy)
    # Opacus accounts a sample rate of 1 / len(loader) and reads the expected batch size
    # off this loader; the batches themselves are PoissonBatches at that rate.
    loader = DataLoader(TensorDataset(images, labels), batch_size=run.training.batch_size)
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=run.dp.clip_norm,
        poisson_sampling=False,
        grad_sample_mode=run.dp.grad_sample_mode,
    )
    module, dp_optimizer = private[0], private[1]
    module.forbid_grad_accumulation()  # what make_private does for a loader it samples itself
    draw_noise_from(dp_optimizer, noise)
    batches = PoissonBatches(images, labels, 1 / len(loader), len(loader), noise)
    return engine, module, dp_optimizer, private[2] if run.dp.grad_sample_mode == "ghost" else criterion, batches


def _local_optimizer(model: nn.Module, training: TrainingConfig, learning_rate: float) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=learning_rate)
    return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=training.momentum)


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    batches: Iterable[Batch],
    epochs: int,
    device: torch.device,
    global_weights: list[torch.Tensor],
    proximal_mu: float,
    learning_rate: float,
    deadline: float,
    join_canaries: Callable[[int], None] | None,
) -> tuple[float, int, int, int]:
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    # Each trainable parameter beside its global weight: a frozen one in between must not
    # shift the pairs.
    anchored = [
        (parameter, anchor)
        for parameter, anchor in zip(model.parameters(), global_weights, strict=True)
        if parameter.requires_grad
    ]
    for _ in range(epochs):
        for batch_images, batch_labels in batches:
            images, labels = batch_images.to(device), batch_labels.to(device)
            optimizer.zero_grad()
            if len(labels) == 0:
                # Only Poisson sampling yields empty batches, so `optimizer` is Opacus'.
                # The step still happens: skipping it would reveal that the batch was
                # empty and shift the accounted step count.
                empty_batch_gradients(optimizer)
            else:
                logits = model(images)
                loss = criterion(logits, labels)
                loss.backward()
                loss_sum += float(loss.item()) * len(labels)
                correct += int((logits.argmax(dim=1) == labels).sum())
                seen += len(labels)
            if join_canaries is not None:
                join_canaries(len(labels))
            optimizer.step()
            if proximal_mu > 0:
                _proximal_pull(anchored, proximal_mu * learning_rate)
            steps += 1
            if time.monotonic() > deadline:
                raise RoundOverTime(steps)
    return loss_sum, correct, seen, steps


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP-SGD step of an empty batch, the same in every grad-sample mode.

    It is Opacus' own step given an empty batch's gradients: no per-sample gradients
    (what hooks, functorch and ew clip) and a zero clipped sum (what ghost clipping
    noises), so the update is Gaussian noise of std sigma * C over the expected batch
    size, and the accountant's step hook counts the step. Running the empty batch through
    the model instead fails inside Opacus in the ew and functorch modes.
    """
    empty_batch_gradients(optimizer)
    optimizer.step()


def empty_batch_gradients(optimizer: DPOptimizer) -> None:
    """An empty batch's gradients, as noise_only_step's step takes them."""
    for parameter in optimizer.params:
        parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
        parameter.grad = torch.zeros_like(parameter)


@torch.no_grad()
def _proximal_pull(anchored: Sequence[tuple[torch.Tensor, torch.Tensor]], strength: float) -> None:
    """FedProx's proximal term as a step towards the global weights after each update.

    It depends only on the released weights, so under DP it is post-processing and costs
    no privacy; adding it to the loss instead would bypass Opacus' per-sample clipping.
    """
    for parameter, anchor in anchored:
        parameter.sub_(strength * (parameter - anchor.to(parameter.device)))
