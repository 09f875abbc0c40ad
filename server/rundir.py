"""The run directory: everything a run leaves behind, written so a crash never leaves a
half-written file.

runs/<name>-<timestamp>/
  config.json            the resolved run config and its fingerprint
  metrics.jsonl          one line a round
  privacy_ledger.jsonl   the sites' signed ledger entries of this run
  site-keys.json         each site's ledger keys in the coordinator's site book at the start
  federation/<site>/     in simulation, each site's own state (ledger, key, policy); the
                         audit's canary clients' under audit-canary-clients/
  site-data/site-N.npz   in simulation, each site's data, as the simulation hands it over
                         (client.site_data)
  checkpoints/round-NNNN.pt
  model.pt               the final global model (state_dict)
  summary.json           the final figures, written last
  plots/accuracy.png, plots/epsilon.png
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import CohortInputError
from common.privacy.ledger import LEDGER_FILE
from common.private_files import open_private, private_dir
from server.records import RoundRecord, Summary
from server.run_config import RunConfig

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoints"
PLOT_DIR = "plots"


@dataclass(frozen=True)
class RunDirectory:
    path: Path

    @classmethod
    def for_new_run(cls, run: RunConfig, root: Path = Path("runs")) -> RunDirectory:
        """The directory named in the config, or runs/<name>-<timestamp>."""
        path = Path(run.run_dir) if run.run_dir else root / f"{run.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return cls(path.resolve())

    def prepare(self, run: RunConfig) -> None:
        """Create the directory and record the config it was created for."""
        private_dir(self.path / CHECKPOINT_DIR)
        private_dir(self.path / PLOT_DIR)
        write_json_atomic(self.path / CONFIG_FILE, {"run_config": run.to_flower(), "fingerprint": run.fingerprint()})

    def reopen(self) -> None:
        """A resumed run is unfinished again: summary.json, which exists only for a
        finished run (whoever follows a run takes its appearance as the end), goes until
        the resumed run writes its own. Without this, a run that had stopped (a stop
        reason, or its ServerApp writing one as the command was stopped) would look
        finished the moment it was resumed."""
        self.summary_file.unlink(missing_ok=True)

    def read_config(self) -> RunConfig:
        file = self.path / CONFIG_FILE
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
            return RunConfig.from_flower(saved["run_config"])
        except FileNotFoundError:
            raise CohortInputError(f"{self.path} is not a Cohort run directory ({CONFIG_FILE} is missing)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CohortInputError(f"{file} is corrupt ({error}); start a new run instead of resuming") from None

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def ledger_file(self) -> Path:
        return self.path / LEDGER_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def plot_dir(self) -> Path:
        return self.path / PLOT_DIR

    def read_metrics(self) -> list[RoundRecord]:
        return [RoundRecord.from_json(line) for line in read_jsonl(self.metrics_file)]

    def read_summary(self) -> Summary | None:
        """The run's final figures; None while it has not finished."""
        if not self.summary_file.is_file():
            return None
        return Summary.from_json(json.loads(self.summary_file.read_text(encoding="utf-8")))

    def final_model(self, run: RunConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """The finished run's global model, for what is measured after the run."""
        import torch

        from common.models.registry import build_model

        if not self.model_file.is_file():
            raise CohortInputError(f"{self.model_file} is missing: the run did not finish; use a finished run")
        model = build_model(run.training.model, input_shape, num_classes)
        try:
            model.load_state_dict(torch.load(self.model_file, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError) as error:
            raise CohortInputError(
                f"{self.model_file} does not load into the run's model ({error}); use the run that wrote it"
            ) from None
        return model


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def write_torch_atomic(path: Path, payload: Any) -> None:
    """torch.save, but never leaving a half-written file behind."""
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temporary file beside the target, fsync, then rename over it.

    The temporary file is created private (0600) and widened to `mode` before any byte is
    written, so a private key is never readable by others, even for an instant.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_lines(path: Path, lines: Iterable[str]) -> None:
    """Append whole lines and fsync, so a crash loses at most the lines being written."""
    with open_private(path, "a") as stream:
        for line in lines:
            stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a torn last line (a crash mid-append) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise CohortInputError(f"{path}: line {number} is not JSON; the file was edited or damaged") from None
    return records


def keep_rounds_up_to(path: Path, last_round: int) -> None:
    """Drop lines from rounds after the checkpoint we resume from: they will be redone."""
    records = [RoundRecord.from_json(line) for line in read_jsonl(path)]
    kept = [json.dumps(r.to_json(), sort_keys=True) for r in records if r.round <= last_round]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
