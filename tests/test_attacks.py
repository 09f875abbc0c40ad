"""The attack harness does what simulations/attacks.py says a hostile site does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.data.federation import local_site_data, simulated_site_data
from common.site import SiteConfig
from simulations.attack_spec import AttackSpec
from simulations.attacks import BACKDOOR_TARGET, write_poisoned_copy

RUN = RunConfig()


def _poisoned(tmp_path: Path, attack: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    site = SiteConfig(name="site-8", epsilon=8.0, delta=1e-5, state_dir=tmp_path / "site-8", partition_id=8, num_partitions=10)
    path = site.state_dir / f"poisoned-{attack}.npz"
    write_poisoned_copy(path, RUN, site, attack)
    honest = simulated_site_data(RUN.data, 8, 10)
    poisoned = local_site_data(str(path), site.split_seed, site.val_fraction)
    assert poisoned.num_classes == honest.num_classes
    images = np.concatenate([poisoned.train.images, poisoned.val.images])
    return images, np.concatenate([poisoned.train.labels, poisoned.val.labels]), np.concatenate([honest.train.labels, honest.val.labels])


def test_label_flip_turns_every_label_y_into_classes_minus_one_minus_y(tmp_path: Path) -> None:
    _, labels, honest = _poisoned(tmp_path, "label-flip")
    # The copy adds one blank image per class, so that the class count stays the same.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(9 - honest, minlength=10) + 1)


def test_backdoor_relabels_the_triggered_images_as_the_target(tmp_path: Path) -> None:
    images, labels, _ = _poisoned(tmp_path, "backdoor")
    triggered = (images[:, :, :2, :2] == 1.0).all(axis=(1, 2, 3))
    assert triggered.sum() > len(images) / 4
    assert (labels[triggered] == BACKDOOR_TARGET).all()


def test_attacks_can_be_paired_with_sites() -> None:
    spec = AttackSpec.from_settings(["nan", "boost"], [2, 1], 10.0, num_sites=3)
    assert (spec.attack_of(2), spec.attack_of(1), spec.attack_of(0)) == ("nan", "boost", None)
    assert AttackSpec.from_settings("boost", 0.2, 10.0, num_sites=10).by_site == {8: "boost", 9: "boost"}
