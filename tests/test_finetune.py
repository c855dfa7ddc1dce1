"""Fine-tuning: learns from a few annotated slices, returns a new model, and refuses labels that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
from training_support import TINY, same, toy_case, weights

from mednca.errors import MedNCAError, VolumeError
from mednca.model import MedNCA
from mednca.registry import ModelEntry
from mednca.training import finetune, finetune_iter, new_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MedNCA:
    return new_model(TINY, MedNCA(TINY).preprocessing, seed=0)


def test_finetune_learns_the_annotated_slices_in_a_new_model(model):
    image, labels = toy_case(7)
    sparse = np.zeros_like(labels.array)
    sparse[..., [1, 4]] = labels.array[..., [1, 4]]
    before = weights(model)
    tuned, report = finetune(model, image, sparse, iterations=60, lr=2e-2)
    assert tuned is not model and same(before, weights(model))
    assert not same(before, weights(tuned))
    assert report.slices == [1, 4] and len(report.losses) == 60
    assert report.dice_after["whole"] > report.dice_before["whole"] + 0.2
    assert tuned.provenance["finetune"]["slices"] == [1, 4]
    assert "finetuned_from" in tuned.provenance and "finetune" not in model.provenance


def test_finetune_is_cancellable_and_seeded(model):
    image, labels = toy_case(3)
    gen = finetune_iter(model, image, labels, iterations=50)
    first = next(gen)
    gen.close()
    assert first.iteration == 1 and first.total == 50
    a, _ = finetune(model, image, labels, slices=[2], iterations=3)
    b, _ = finetune(model, image, labels, slices=[2], iterations=3)
    assert same(weights(a), weights(b))


def test_labels_must_fit_the_volume_and_the_model(model):
    image, labels = toy_case(1)
    with pytest.raises(VolumeError, match="shape"):
        finetune(model, image, labels.array[:-1], iterations=1)
    too_many = labels.array.copy()
    too_many[0, 0, 0] = 3
    with pytest.raises(MedNCAError, match="class 3"):
        finetune(model, image, too_many, iterations=1)
    with pytest.raises(MedNCAError, match="no annotated slice"):
        finetune(model, image, np.zeros_like(labels.array), iterations=1)
    with pytest.raises(MedNCAError, match="outside the volume"):
        finetune(model, image, labels, slices=[99], iterations=1)


def test_a_fine_tuned_model_does_not_claim_the_held_out_dice_of_the_model_it_came_from(tmp_path):
    image, labels = toy_case(5)
    measured = {"validation_dice_native": {"whole": 0.9, "cases": 21}, "validation_cases": ["case_1"]}
    base = ModelEntry("base", tmp_path / "base.safetensors", "user", {"provenance": measured})
    start = MedNCA(TINY)
    start.provenance = measured
    tuned, _ = finetune(start, image, labels, slices=[2], iterations=1)
    entry = ModelEntry("tuned", tmp_path / "tuned.safetensors", "user", {"provenance": tuned.provenance})
    assert "whole Dice 0.900 on 21 held-out cases" in base.summary
    assert "Dice" not in entry.summary
    assert tuned.provenance["validation_cases"] == ["case_1"]  # still evaluated on the cases its base never saw
