"""Loss and accuracy of a model on labelled images: the server's central evaluation and
each site's local validation use the same measurement."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.data.dataset import LabeledImages


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, device: torch.device, batch_size: int = 512) -> Evaluation:
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        images = torch.from_numpy(data.images[start : start + batch_size]).to(device)
        labels = torch.from_numpy(data.labels[start : start + batch_size]).to(device)
        logits = model(images)
        total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    count = max(len(data), 1)
    return Evaluation(loss=total_loss / count, accuracy=correct / count, num_examples=len(data))


def resolve_device(choice: str) -> torch.device:
    """'auto' takes CUDA when this process can see a GPU; 'cuda' insists on one."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
