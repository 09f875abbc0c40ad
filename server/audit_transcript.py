"""The empirical audit's transcript: the canary site's update of every round, as the
coordinator received it, kept in a simulation for `cohort audit empirical`.

Sample-level DP-SGD protects a site's examples against whoever sees its released updates,
and the coordinator sees each one, round after round: that transcript, not the final
global model diluted by every other site's average, is what the DP guarantee is stated
against and what an audit of it should score. A simulation keeps it only when the run
asks (DataConfig.keeps_transcript: canaries, and the transcript observer); a deployed
run refuses that setting (cli/deploy.py), so no real site's updates are ever kept.

run_dir/audit-transcript/round-NNNN.pt holds {"global": the model the round sent,
"released": the canary site's reply}, both state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from common.private_files import private_dir
from server.run_config import DataConfig
from server.rundir import write_torch_atomic

TRANSCRIPT_DIR = "audit-transcript"

StateDict = dict[str, torch.Tensor]


def canary_site(config: DataConfig) -> str:
    """The name of the simulated site that holds the canaries."""
    return f"site-{config.audit_canary_site}"


@dataclass(frozen=True)
class AuditTranscript:
    """Where a run keeps its canary site's updates, and which site that is."""

    path: Path
    site: str

    @classmethod
    def for_run(cls, config: DataConfig, run_dir: Path) -> AuditTranscript | None:
        """The run's transcript, or None when the run keeps none."""
        if not config.keeps_transcript:
            return None
        return cls(private_dir(run_dir / TRANSCRIPT_DIR), canary_site(config))

    def keep(self, server_round: int, site: str, sent: ArrayRecord, released: ArrayRecord) -> None:
        """Keep `site`'s reply to this round's model `sent`, when it is the canary site."""
        if site == self.site:
            payload = {"global": sent.to_torch_state_dict(), "released": released.to_torch_state_dict()}
            write_torch_atomic(self.path / f"round-{server_round:04d}.pt", payload)


def read_transcript(run_dir: Path) -> list[tuple[StateDict, StateDict]]:
    """Every kept round's (global model sent, canary site's reply), in round order."""
    rounds = []
    for file in sorted((run_dir / TRANSCRIPT_DIR).glob("round-*.pt")):
        saved = torch.load(file, map_location="cpu", weights_only=True)
        rounds.append((saved["global"], saved["released"]))
    return rounds
