"""What a resumed run starts from: the newest checkpoint, the metrics up to it, and no
summary.json until it writes its own (a stopped run may have left one behind)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common.models.registry import build_model
from server.checkpoint import Checkpoint
from server.federation import initial_state
from server.records import RoundRecord
from server.run_config import RunConfig
from server.rundir import RunDirectory, append_lines, write_json_atomic


def _stopped_run(path: Path) -> tuple[RunConfig, RunDirectory]:
    """A run that checkpointed round 2, logged round 3 and wrote a summary naming a stop."""
    run = RunConfig()
    run_dir = RunDirectory(path)
    run_dir.prepare(run)
    model = build_model(run.training.model, (1, 8, 8), 10)
    Checkpoint(2, model.state_dict(), run.fingerprint(), "{}", {}, "{}").save(run_dir.checkpoint_dir)
    append_lines(
        run_dir.metrics_file, [json.dumps(RoundRecord(n, accuracy=0.5, loss=1.0).to_json()) for n in (1, 2, 3)]
    )
    write_json_atomic(run_dir.summary_file, {"stop_reason": "stopped after round 3: 0 update(s) passed the checks"})
    return dataclasses.replace(run, resume_from=str(path)), run_dir


def test_a_resumed_run_continues_after_its_newest_checkpoint_with_the_metrics_up_to_it(tmp_path: Path) -> None:
    run, run_dir = _stopped_run(tmp_path)
    state = initial_state(run, run_dir, build_model(run.training.model, (1, 8, 8), 10))
    assert state.next_round == 3
    assert [m.round for m in run_dir.read_metrics()] == [1, 2]


def test_a_resumed_run_has_no_summary_until_it_writes_its_own(tmp_path: Path) -> None:
    run, run_dir = _stopped_run(tmp_path)
    initial_state(run, run_dir, build_model(run.training.model, (1, 8, 8), 10))
    assert not run_dir.summary_file.exists()
