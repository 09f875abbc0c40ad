"""Cohort's ServerApp and ClientApp under secure aggregation, in one process
(simulations/in_process.py): the real round loop, the real sites (data, training, ledger
and all); only Flower's transport is left out. A hook on the sites' masking records each
update before it is masked, so the tests can compare what the coordinator released and
what it saw with what the sites computed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import client.secure_aggregation as site_protocol
from audit.spending import audit
from client.app import app as client_app
from client.integer_update import clipped
from common.models.registry import build_model
from common.privacy.ledger import RecordKind, read_entries
from common.privacy.mechanisms import Mechanism
from common.privacy.skellam import SkellamRelease, epsilon
from common.secure_aggregation import field as modular
from common.secure_aggregation.messages import MASKED_INPUT, MASKED_VECTOR, RECORD, REFUSED, Stage
from common.secure_aggregation.model_vector import update_vector
from server.held_out import federated_split
from server.records import RoundRecord, Summary
from server.run_config import RunConfig
from server.secure_aggregation_plan import run_parameters
from simulations.in_process import InProcessGrid, exchange_of, node_ids, run_in_process

SITES = 5
NODES = node_ids(SITES)


@dataclass
class Run:
    """One in-process run: its directory, grid, and what the sites masked."""

    path: Path
    grid: InProcessGrid
    updates: dict[int, np.ndarray]
    global_model: ArrayRecord

    def records(self) -> list[RoundRecord]:
        return [
            RoundRecord.from_json(json.loads(line)) for line in (self.path / "metrics.jsonl").read_text().splitlines()
        ]

    def summary(self) -> Summary:
        return Summary.from_json(json.loads((self.path / "summary.json").read_text()))

    def final_model(self) -> dict[str, torch.Tensor]:
        return torch.load(self.path / "model.pt")

    def released_update(self) -> np.ndarray:
        return update_vector(ArrayRecord(self.final_model()), self.global_model)


@pytest.fixture
def run_federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clientapp_identity: None):
    masking = site_protocol.masked_input

    def run(drop: dict[int, str] | None = None, **settings: Any) -> Run:
        updates: dict[int, np.ndarray] = {}

        def recording(context: Context, server_round: int, update: np.ndarray, encode) -> np.ndarray:
            updates[context.node_id] = update.copy()
            return masking(context, server_round, update, encode)

        monkeypatch.setattr(site_protocol, "masked_input", recording)
        config = {"secure-aggregation": True, "rounds": 1, "dp": False, "site-allow-non-private": True, **settings}
        path = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        grid = run_in_process(config, SITES, path, drop)
        return Run(path, grid, updates, _initial_model(RunConfig.from_flower(grid.run_config)))

    return run


def _initial_model(run: RunConfig) -> ArrayRecord:
    """The global model a run starts from, made as the ServerApp makes it."""
    split = federated_split(run.data)
    torch.manual_seed(run.data.seed)
    return ArrayRecord(build_model(run.training.model, split.input_shape, split.num_classes).state_dict())


def _mean_clipped(run: Run, nodes: list[int], clip: float) -> np.ndarray:
    return np.mean([clipped(run.updates[node], clip) for node in nodes], axis=0)


def _scale(dimension: int, clip: float) -> float:
    return np.sqrt(dimension) / (1e-3 * clip)


def test_the_released_model_is_the_mean_of_the_sites_clipped_updates_within_quantization_error(run_federation) -> None:
    run = run_federation()
    assert sorted(run.updates) == NODES
    released, expected = run.released_update(), _mean_clipped(run, NODES, 10.0)
    # each site's rounding moves a coordinate by less than 1/scale; the model is stored in float32
    assert np.abs(released - expected).max() < 1 / _scale(released.size, 10.0) + 1e-6
    assert np.abs(expected).max() > 100 / _scale(released.size, 10.0), "the updates are far above the quantization step"


def test_the_coordinator_never_holds_an_individual_update(run_federation) -> None:
    run = run_federation()
    arrays = [
        array.numpy().astype(np.float64).ravel()
        for reply in run.grid.received
        if reply.has_content()
        for record in reply.content.array_records.values()
        for array in record.values()
    ]
    masked = [
        reply.content.array_records[MASKED_INPUT][MASKED_VECTOR].numpy()
        for reply in run.grid.received
        if reply.has_content() and MASKED_INPUT in reply.content.array_records
    ]
    assert len(masked) == SITES and all(
        len(reply.content.array_records) <= 1 for reply in run.grid.received if reply.has_content()
    )
    global_vector = np.concatenate([array.numpy().astype(np.float64).ravel() for array in run.global_model.values()])
    for update in run.updates.values():
        trained = global_vector + update
        assert not any(
            a.size == update.size and (np.allclose(a, update, atol=1e-3) or np.allclose(a, trained, atol=1e-3))
            for a in arrays
        )
    scale = _scale(global_vector.size, 10.0)
    assert all(np.linalg.norm(modular.from_field(vector, 32) / scale) > 1e3 for vector in masked), (
        "a masked input decodes to noise far beyond any clipped update"
    )


@pytest.mark.parametrize("stage", [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK])
def test_a_site_dropping_at_any_stage_leaves_the_round_released_with_the_others_sum(
    run_federation, stage: Stage
) -> None:
    gone = NODES[1]
    run = run_federation(drop={gone: str(stage)})
    (record,) = run.records()
    contributors = NODES if stage == Stage.UNMASK else [n for n in NODES if n != gone]
    assert len(record.sites) >= len(contributors) and sum(site.trained for site in record.sites.values()) == len(
        contributors
    )
    assert [f.stage for f in record.failures] == [str(stage)]
    assert (
        np.abs(run.released_update() - _mean_clipped(run, contributors, 10.0)).max()
        < 1 / _scale(run.released_update().size, 10.0) + 1e-6
    )


@pytest.mark.parametrize("stage", [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK])
def test_dropouts_beyond_the_threshold_abandon_the_round_and_keep_the_global_model(
    run_federation, stage: Stage
) -> None:
    run = run_federation(drop={node: str(stage) for node in NODES[:3]})
    (record,) = run.records()
    assert not any(site.trained for site in record.sites.values())
    assert np.abs(run.released_update()).max() == 0.0
    assert "fewer than min-sites" in run.summary().stop_reason and run.grid.stopped == run.summary().stop_reason


def test_a_site_that_refuses_the_study_at_the_ask_is_in_none_of_the_rounds_secure_aggregation(
    run_federation, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("federation")
    (home / "site-0").mkdir()
    (home / "site-0" / "policy.toml").write_text("study-epsilon = 1.0\n")  # grants at most 1 of its 8
    run = run_federation(**{"dp": True, "study-epsilon": 2.0, "federation-home": str(home)})
    refusing = NODES[0]
    assert {exchange_of(m) for m in run.grid.sent if m.metadata.dst_node_id == refusing} == {"query"}, (
        "asked, then sent nothing"
    )
    assert sorted(run.updates) == NODES[1:]
    (record,) = run.records()
    assert {name for name, site in record.sites.items() if site.trained} == {f"site-{i}" for i in range(1, SITES)}
    # The coordinator never takes a name from a refusal's text: an unregistered node that
    # refuses before it ever answered is known by its node id.
    assert "site site-0 refuses the study: it asks epsilon 2" in record.refusal_reasons[f"node {refusing}"]
    (refusal,) = [e.record for e in read_entries(home / "site-0" / "privacy_ledger.jsonl")]
    assert (refusal.kind, refusal.round, refusal.dataset_hash) == (RecordKind.REFUSAL, 0, "")
    assert (
        np.abs(run.released_update() - _mean_clipped(run, NODES[1:], 10.0)).max()
        < 1 / _scale(run.released_update().size, 10.0) + 1e-6
    )


def test_a_study_too_few_sites_grant_to_unmask_a_round_stops_before_round_1_naming_why(
    run_federation, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The parameters are sized for all five sites before the study's ask; with two
    refusing, no round of the remaining three could be unmasked (it needs four)."""
    home = tmp_path_factory.mktemp("federation")
    for site in ("site-0", "site-1"):
        (home / site).mkdir()
        (home / site / "policy.toml").write_text("study-epsilon = 1.0\n")  # grants at most 1 of its 8
    run = run_federation(**{"dp": True, "study-epsilon": 2.0, "federation-home": str(home)})
    assert {exchange_of(m) for m in run.grid.sent} == {"query"}, "asked, then sent nothing"
    assert run.grid.stopped.startswith(
        "stopped before round 1: 3 site(s) can still train, fewer than the 4 a securely aggregated round"
    ), run.grid.stopped
    assert all(f"site {site} refuses the study: it asks epsilon 2" in run.grid.stopped for site in ("site-0", "site-1"))


def test_parameters_that_cannot_hold_the_sum_stop_the_run_before_round_1_with_nothing_sent(run_federation) -> None:
    run = run_federation(**{"secure-aggregation-bits": 8})
    assert run.grid.sent == [] and run.summary().stop_reason == run.grid.stopped
    assert run.grid.stopped.startswith(
        "stopped before round 1: secure-aggregation-bits = 8 cannot hold the sum of 5 sites' updates"
    )


def test_distributed_dp_ledgers_each_release_with_the_noise_of_the_sites_that_contributed(run_federation) -> None:
    dropped = NODES[2]
    run = run_federation(
        drop={dropped: str(Stage.MASKED_INPUT)},
        rounds=2,
        **{"dp": True, "dp-level": "client", "clipping-side": "client", "client-epsilon": 8.0},
    )
    records = [e.record for e in read_entries(run.path / "server" / "privacy_ledger.jsonl")]
    assert [(r.kind, r.mechanism, r.round) for r in records] == [
        (RecordKind.RELEASE, Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM, 1),
        (RecordKind.RELEASE, Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM, 2),
    ]
    assert all(len(json.loads(r.mechanism_details)["sites"]) == SITES - 1 for r in records)
    planned = run_parameters(RunConfig.from_flower(run.grid.run_config), SITES, run.released_update().size)
    releases = [SkellamRelease.from_details(r.mechanism_details) for r in records]
    assert all(release.variance == pytest.approx((SITES - 1) * planned.noise_variance) for release in releases), (
        "the dropped site's noise is not counted"
    )
    assert records[-1].epsilon == pytest.approx(epsilon(releases, 1e-5)) and records[-1].epsilon <= 8.0
    server = audit(run.path)["sites"]["server"]
    assert server["mechanisms"] == [Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM] and server[
        "epsilon_total"
    ] == pytest.approx(records[-1].epsilon)
    sites = [e.record for e in read_entries(run.path / "privacy_ledger.jsonl")]
    assert {(r.kind, r.mechanism) for r in sites} == {
        (RecordKind.NON_PRIVATE, Mechanism.CLIENT_LEVEL_DISTRIBUTED_SKELLAM)
    }


@pytest.mark.parametrize("secure_run", [True, False])
def test_a_site_refuses_a_request_that_contradicts_how_the_run_says_its_update_leaves_it(
    tmp_path: Path, clientapp_identity: None, secure_run: bool
) -> None:
    run_config = {
        "secure-aggregation": secure_run,
        "dp": False,
        "site-allow-non-private": True,
        "run-dir": str(tmp_path),
        "federation-home": str(tmp_path / "federation"),
    }
    model = _initial_model(RunConfig.from_flower(run_config))
    content = RecordDict({"arrays": model, "config": ConfigRecord({"server-round": 1})})
    if not secure_run:
        content[RECORD] = ConfigRecord({"stage": str(Stage.ADVERTISE_KEYS)})
    context = Context(
        run_id=7,
        node_id=NODES[0],
        node_config={"partition-id": 0, "num-partitions": SITES},
        state=RecordDict(),
        run_config=run_config,
    )
    reply = client_app(Message(content, dst_node_id=NODES[0], message_type="train"), context)
    assert reply.has_error() and reply.error.code == REFUSED and "secure aggregation" in reply.error.reason
