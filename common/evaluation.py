"""Loss and accuracy of a model on labelled images: the server's central evaluation and
each site's local validation use the same measurement."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.data.dataset import LabeledImages


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class Predictions:
    """Per example: the predicted class and the cross-entropy loss of the true label."""

    classes: np.ndarray
    losses: np.ndarray


@torch.no_grad()
def predict(model: nn.Module, data: LabeledImages, device: torch.device, batch_size: int = 512) -> Predictions:
    model.eval()
    classes, losses = [], []
    for start in range(0, len(data), batch_size):
        images = torch.from_numpy(data.images[start : start + batch_size]).to(device)
        labels = torch.from_numpy(data.labels[start : start + batch_size]).to(device)
        logits = model(images)
        losses.append(nn.functional.cross_entropy(logits, labels, reduction="none").cpu().numpy())
        classes.append(logits.argmax(dim=1).cpu().numpy())
    if not classes:
        return Predictions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    return Predictions(np.concatenate(classes), np.concatenate(losses))


def evaluate(model: nn.Module, data: LabeledImages, device: torch.device) -> Evaluation:
    predictions = predict(model, data, device)
    count = max(len(data), 1)
    correct = int((predictions.classes == data.labels).sum())
    return Evaluation(
        loss=float(predictions.losses.sum(dtype=np.float64)) / count, accuracy=correct / count, num_examples=len(data)
    )


def resolve_device(choice: str) -> torch.device:
    """'auto' takes CUDA when this process can see a GPU; 'cuda' insists on one."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
