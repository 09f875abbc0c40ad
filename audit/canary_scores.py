"""How the empirical audit scores each canary: one score per (canary kind, observer), higher
meaning "more likely trained on". The one-run test (audit.one_run) then only counts guesses.

Observers (DataConfig.audit_observer):
- transcript: the canary site's update of every round, as the coordinator received it
  (server.audit_transcript): what sample-level DP-SGD promises to hide from whoever sees
  the site's releases, and the strongest view an auditor of a site has.
- final-model: the final global model alone, diluted by every other site's average and by
  the rounds after each step: what anyone handed the model sees.

Canary kinds (DataConfig.audit_canary_kind):
- dirac: a gradient canary pushes its coordinate down by its step each time it is sampled;
  its score is how far the observed models moved against that coordinate.
- input: a wrong-labelled image; its score is how much the observed training lowered its
  loss (transcript), or how low its loss ends (final model).
"""

from __future__ import annotations

import numpy as np
import torch

from common.data.dataset import LabeledImages
from common.evaluation import predict

StateDict = dict[str, torch.Tensor]

DESCRIPTIONS = {
    ("dirac", "transcript"): "how far the canary site's update of every round moved against each canary's coordinate",
    (
        "dirac",
        "final-model",
    ): "how far the final global model moved from the initial one against each canary's coordinate",
    ("input", "transcript"): "how much the canary site's update of every round lowered each canary's loss",
    ("input", "final-model"): "each canary's loss (with its wrong label) under the final global model",
}


def flat_parameters(state: StateDict, names: list[str]) -> np.ndarray:
    """The trainable parameters `names` of a state dict, flattened in that order (the
    order gradient canaries' coordinates index)."""
    return np.concatenate([state[name].detach().cpu().numpy().ravel() for name in names]).astype(np.float64)


def dirac_scores(models: list[tuple[StateDict, StateDict]], names: list[str], coordinates: np.ndarray) -> np.ndarray:
    """Summed over (before, after) pairs: how far each coordinate went down."""
    scores = np.zeros(len(coordinates))
    for before, after in models:
        scores += (flat_parameters(before, names) - flat_parameters(after, names))[coordinates]
    return scores


def input_transcript_scores(
    rounds: list[tuple[StateDict, StateDict]], model: torch.nn.Module, canaries: LabeledImages
) -> np.ndarray:
    """Summed over rounds: each canary's loss under the global model sent minus its loss
    under the canary site's reply."""
    scores = np.zeros(len(canaries))
    for sent, released in rounds:
        scores += _losses(model, sent, canaries) - _losses(model, released, canaries)
    return scores


def input_final_scores(model: torch.nn.Module, canaries: LabeledImages) -> np.ndarray:
    """Minus each canary's loss under the final model (already loaded into `model`)."""
    return -predict(model, canaries, torch.device("cpu")).losses.astype(np.float64)


def _losses(model: torch.nn.Module, state: StateDict, canaries: LabeledImages) -> np.ndarray:
    model.load_state_dict(state)
    with torch.no_grad():
        return predict(model, canaries, torch.device("cpu")).losses.astype(np.float64)
