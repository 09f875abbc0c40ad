"""Per-round checkpoints: enough to resume a run at the next round as if it had not
stopped. Privacy spending is not in them: each site's ledger (and, at client level, the
server's) is the record of what was spent, and is never rolled back."""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import CohortInputError
from server.rundir import write_torch_atomic

_NAME = re.compile(r"round-(\d{4,})\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """The state after `round` rounds.

    weights: the global model's state_dict.
    fingerprint: RunConfig.fingerprint() of the run that wrote it.
    metrics: the round's metrics.jsonl line.
    optimizer: the server optimizer's state (server.strategies.optimizer_state).
    sites: the site registry (names, ledger keys, newest accepted entries) as JSON.
    """

    round: int
    weights: dict[str, torch.Tensor]
    fingerprint: str
    metrics: str
    optimizer: dict[str, torch.Tensor]
    sites: str

    def save(self, directory: Path) -> Path:
        path = directory / f"round-{self.round:04d}.pt"
        payload = {
            "round": self.round,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "metrics": self.metrics,
            "optimizer": self.optimizer,
            "sites": self.sites,
        }
        write_torch_atomic(path, payload)
        return path

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            # weights_only: a checkpoint is data, never code to execute.
            raw = torch.load(path, map_location="cpu", weights_only=True)
            return cls(
                round=int(raw["round"]),
                weights=dict(raw["weights"]),
                fingerprint=str(raw["fingerprint"]),
                metrics=str(raw["metrics"]),
                optimizer={str(k): v for k, v in raw["optimizer"].items()},
                sites=str(raw["sites"]),
            )
        except (
            OSError,
            RuntimeError,
            EOFError,
            KeyError,
            TypeError,
            ValueError,
            zipfile.BadZipFile,
            pickle.UnpicklingError,
        ) as error:
            raise CohortInputError(
                f"checkpoint {path} is corrupt ({type(error).__name__}); delete it to resume from the one before"
            ) from None


def latest_checkpoint(directory: Path, fingerprint: str) -> Checkpoint:
    """The newest checkpoint in `directory`, refused if another config wrote it."""
    candidates = sorted((int(m.group(1)), p) for p in directory.glob("round-*.pt") if (m := _NAME.search(p.name)))
    if not candidates:
        raise CohortInputError(
            f"no checkpoint in {directory}; the run stopped before its first round finished, start it anew"
        )
    checkpoint = Checkpoint.load(candidates[-1][1])
    if checkpoint.fingerprint != fingerprint:
        raise CohortInputError(
            f"checkpoint {candidates[-1][1]} was written by a different run config; resume with that run's "
            "own config (cohort simulate --resume RUN_DIR uses it)"
        )
    return checkpoint
