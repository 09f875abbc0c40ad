"""Pretraining the initial global model on public data (server/pretraining.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from common.data.builtin import load_digits
from common.errors import CohortInputError
from common.evaluation import evaluate
from common.models.registry import build_model
from server.pretraining import pretrain, public_images
from server.run_config import DataConfig, PretrainingConfig, RunConfig

DIGITS_SHAPE = (1, 8, 8)
ONE_EPOCH_OF_MNIST = PretrainingConfig(pretrain_dataset="mnist-5k", pretrain_epochs=1)


def _pretrained(model_name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(model_name, DIGITS_SHAPE, 10)
    pretrain(model, ONE_EPOCH_OF_MNIST, DIGITS_SHAPE, 10, seed)
    return model


def test_public_images_take_the_shape_of_the_runs_images() -> None:
    public = public_images(ONE_EPOCH_OF_MNIST, DIGITS_SHAPE, 10)
    assert public.images.shape == (5000, *DIGITS_SHAPE)
    assert set(np.unique(public.labels)) == set(range(10))


def test_a_model_pretrained_on_public_mnist_already_reads_the_federations_digits() -> None:
    digits = load_digits().train
    chance = evaluate(build_model("scatternet", DIGITS_SHAPE, 10), digits, torch.device("cpu")).accuracy
    pretrained = evaluate(_pretrained("scatternet", 42), digits, torch.device("cpu")).accuracy
    assert pretrained > 0.5 > chance


def test_the_same_seed_pretrains_the_same_model() -> None:
    first, second = _pretrained("cnn", 7).state_dict(), _pretrained("cnn", 7).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_the_machines_thread_count_does_not_change_the_pretrained_model() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _pretrained("cnn", 7).state_dict()
        torch.set_num_threads(4)
        four = _pretrained("cnn", 7).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one[name], four[name]) for name in one)


def test_pretraining_on_the_runs_own_data_is_refused() -> None:
    with pytest.raises(CohortInputError, match="public data only"):
        RunConfig(data=DataConfig(dataset="mnist-5k"), pretraining=ONE_EPOCH_OF_MNIST)


def _three_class_set(folder: Path) -> Path:
    path = folder / "three-classes.npz"
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.random((30, 8, 8)).astype(np.float32), train_labels=np.arange(30) % 3)
    return path


def test_a_public_dataset_with_other_classes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CohortInputError, match="has 3 classes and the run's data 10"):
        public_images(PretrainingConfig(pretrain_dataset=str(_three_class_set(tmp_path))), DIGITS_SHAPE, 10)


def test_cohort_run_refuses_a_public_dataset_it_cannot_pretrain_on_before_submitting(tmp_path: Path) -> None:
    settings = ["--set", f"pretrain-dataset='{_three_class_set(tmp_path)}'", "--set", f"run-dir='{tmp_path / 'run'}'"]
    result = CliRunner().invoke(app, ["run", "no-such-connection", *settings])
    assert result.exit_code == 2
    assert "has 3 classes and the run's data 10" in result.stderr
    assert not (tmp_path / "run").exists()
