"""What a data-poisoning site holds: its own simulated share, with every label flipped or
a backdoor trigger stamped on half its images.

The runner writes the poisoned share in place of the hostile site's honest one before any
site starts (and again when a run is resumed). The hostile site is then an ordinary
simulated site whose data are the attack: its policy, its ledger and its seeded DP noise
are what its honest twin's would be, so a seed gives the same attacked run every time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from client.site_data import SimulatedHolding, simulated_site_file
from common.data.dataset import LabeledImages
from common.private_files import open_private
from simulations.attack_spec import DATA_ATTACKS, AttackSpec

BACKDOOR_TARGET = 0
BACKDOOR_SHARE = 0.5
# The trigger's value: the brightest a normalised pixel gets (common.data.dataset).
TRIGGER_VALUE = 1.0


def stamp_trigger(images: np.ndarray) -> np.ndarray:
    """The backdoor trigger on normalised NCHW images: a bright 2x2 patch, top left."""
    stamped = images.copy()
    stamped[:, :, :2, :2] = TRIGGER_VALUE
    return stamped


def poisoned_holding(holding: SimulatedHolding, attack: str, partition_id: int) -> SimulatedHolding:
    """label-flip: every label y becomes (classes - 1 - y); backdoor: a share of the images,
    drawn by the partition id, carry the trigger and the target label."""
    images, labels = holding.examples.images, holding.examples.labels
    if attack == "label-flip":
        labels = holding.num_classes - 1 - labels
    else:
        chosen = np.random.default_rng(partition_id).random(len(labels)) < BACKDOOR_SHARE
        images = images.copy()
        images[chosen] = stamp_trigger(images[chosen])
        labels = np.where(chosen, BACKDOOR_TARGET, labels)
    return dataclasses.replace(holding, examples=LabeledImages(images, labels))


def poison_site_files(spec: AttackSpec, run_dir: Path) -> None:
    """Replace each data-poisoning site's file in the run directory with its poisoned share."""
    for partition_id, attack in spec.by_site.items():
        if attack not in DATA_ATTACKS:
            continue
        path = simulated_site_file(run_dir, partition_id)
        poisoned = poisoned_holding(SimulatedHolding.read(path), attack, partition_id)
        with open_private(path, "wb") as stream:
            stream.write(poisoned.to_bytes())
