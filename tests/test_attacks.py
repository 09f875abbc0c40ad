"""The attack harness does what simulations/attacks.py says a hostile site does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.site_data import SiteData, simulated_site_file
from client.site_data import simulated_site_data as read_site_data
from common import protocol
from common.models.registry import build_model
from common.privacy.ledger import LedgerEntry
from server.held_out import federated_split
from server.run_config import RunConfig
from simulations.attack_spec import AttackSpec
from simulations.data_poisoning import BACKDOOR_TARGET, TRIGGER_VALUE, poison_site_files
from simulations.federation import simulated_site_data, write_site_files
from simulations.plan import PLAN_FILE

RUN = RunConfig()


def _poisoned(tmp_path: Path, attack: str) -> tuple[SiteData, SiteData]:
    """Site 8 of 10's data as it reads it in a run where it poisons them, and its honest data."""
    run_dir = tmp_path / "run"
    write_site_files(RUN.data, 10, run_dir)
    poison_site_files(AttackSpec.from_settings(attack, [8], 10.0, num_sites=10), run_dir)
    return read_site_data(str(run_dir), 8), simulated_site_data(RUN.data, 8, 10)


def _all(data: SiteData) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([data.train.images, data.val.images]), np.concatenate([data.train.labels, data.val.labels])


def test_label_flip_turns_every_label_y_into_classes_minus_one_minus_y(tmp_path: Path) -> None:
    poisoned, honest = _poisoned(tmp_path, "label-flip")
    np.testing.assert_array_equal(_all(poisoned)[1], 9 - _all(honest)[1])


def test_label_flip_keeps_the_images(tmp_path: Path) -> None:
    poisoned, honest = _poisoned(tmp_path, "label-flip")
    np.testing.assert_array_equal(_all(poisoned)[0], _all(honest)[0])


def test_backdoor_relabels_the_triggered_images_as_the_target(tmp_path: Path) -> None:
    images, labels = _all(_poisoned(tmp_path, "backdoor")[0])
    triggered = (images[:, :, :2, :2] == TRIGGER_VALUE).all(axis=(1, 2, 3))
    assert triggered.sum() > len(images) / 4
    assert (labels[triggered] == BACKDOOR_TARGET).all()


def test_a_poisoning_site_keeps_its_honest_twins_noise_seed_and_split(tmp_path: Path) -> None:
    """So a seed gives the same attacked run every time (a deployed site's noise is never seeded)."""
    poisoned, honest = _poisoned(tmp_path, "label-flip")
    assert poisoned.noise_seed == honest.noise_seed is not None
    assert (len(poisoned.train), len(poisoned.val)) == (len(honest.train), len(honest.val))


def test_only_the_data_poisoning_sites_files_change(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_site_files(RUN.data, 10, run_dir)
    before = {i: simulated_site_file(run_dir, i).read_bytes() for i in range(10)}
    poison_site_files(AttackSpec.from_settings(["label-flip", "sign-flip"], [8, 9], 10.0, num_sites=10), run_dir)
    changed = [i for i in range(10) if simulated_site_file(run_dir, i).read_bytes() != before[i]]
    assert changed == [8]


def test_attacks_can_be_paired_with_sites() -> None:
    spec = AttackSpec.from_settings(["nan", "boost"], [2, 1], 10.0, num_sites=3)
    assert (spec.attack_of(2), spec.attack_of(1), spec.attack_of(0)) == ("nan", "boost", None)
    assert AttackSpec.from_settings("boost", 0.2, 10.0, num_sites=10).by_site == {8: "boost", 9: "boost"}


def _train_hostile_site(attack: str, tmp_path: Path, settings: dict[str, Any]) -> Message:
    """Site 8 of 10, poisoning its data, answers its first training round of a run with these settings."""
    from simulations.attacks import app

    run_dir = tmp_path / "run"
    spec = AttackSpec.from_settings(attack, [8], 10.0, num_sites=10)
    write_site_files(RUN.data, 10, run_dir)
    poison_site_files(spec, run_dir)  # as the runner does
    (run_dir / PLAN_FILE).write_text(json.dumps({"num-sites": 10, "attack": spec.to_json()}))
    run_config = {"run-dir": str(run_dir), "federation-home": str(tmp_path / "federation"), **settings}
    split = federated_split(RUN.data)
    model = build_model(RUN.training.model, split.input_shape, split.num_classes)
    content = RecordDict(
        {protocol.ARRAYS: ArrayRecord(model.state_dict()), protocol.CONFIG: ConfigRecord({protocol.CONFIG_ROUND: 1})}
    )
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"partition-id": 8, "num-partitions": 10},
        state=RecordDict(),
        run_config=run_config,
    )
    return app(Message(content=content, dst_node_id=1, message_type="train"), context)


@pytest.mark.parametrize("attack", ["label-flip", "backdoor"])
def test_a_site_that_poisons_its_data_trains_on_the_poisoned_copy_and_signs_its_release(
    attack: str, tmp_path: Path, clientapp_identity: None
) -> None:
    reply = _train_hostile_site(attack, tmp_path, {"dp": False, "site-allow-non-private": True, "rounds": 1})
    assert not reply.has_error(), reply.error.reason
    entry = LedgerEntry.from_json(str(reply.content[protocol.SITE][protocol.SITE_LEDGER_ENTRY]))
    poisoned = read_site_data(str(tmp_path / "run"), 8)
    assert entry.record.dataset_hash == poisoned.identity != simulated_site_data(RUN.data, 8, 10).identity


def test_a_site_that_poisons_its_data_grants_a_study_what_its_honest_twin_grants(
    tmp_path: Path, clientapp_identity: None
) -> None:
    """A DP study of 50 rounds that a simulated site grants its whole budget: with a deployed
    site's default share (a quarter) its plan would need more noise than the site trains on,
    and the hostile site would refuse instead of attacking."""
    reply = _train_hostile_site("label-flip", tmp_path, {"dp": True, "rounds": 50})
    assert not reply.has_error(), reply.error.reason
    assert reply.content[protocol.SITE][protocol.SITE_LEDGER_ENTRY]
