"""Fine-tuning: learns from a few annotated slices, returns a new model with an honest estimate of how it does
on the slices nobody annotated, advises against a model not expected to be better, and refuses labels that
do not fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from training_support import TINY, same, toy_case, weights

from mednca.errors import MedNCAError, VolumeError
from mednca.finetuning import FINETUNE, advise, finetune, finetune_iter
from mednca.model import MedNCA
from mednca.registry import ModelEntry
from mednca.training import Recipe, native_dice, new_model, train
from mednca.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (20, 20, 10)  # ten slices along the tiny model's axis
PAINTED = [1, 4, 7]


@pytest.fixture(scope="module")
def model() -> MedNCA:
    return new_model(TINY, MedNCA(TINY).preprocessing, seed=0)


@pytest.fixture(scope="module")
def trained() -> MedNCA:
    """A tiny model that has learned the toy cases (bright and dim squares on noise)."""
    cases = [toy_case(seed, SHAPE) for seed in range(6)]
    return train(cases, config=TINY, iterations=150, batch_size=8, val_fraction=0, eval_every=10**6,
                 recipe=Recipe(crop=16, warmup=10))


def painted_only(labels: np.ndarray, slices=PAINTED) -> np.ndarray:
    sparse = np.zeros_like(labels)
    sparse[..., slices] = labels[..., slices]
    return sparse


def inverted(image: Volume) -> Volume:
    """The scan with its contrast inverted: a domain shift the tiny model never saw."""
    return image.like(image.array.max() - image.array)


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
    # what the advice compares with the base's pooled Dice there is pooled over as many runs
    assert report.learned_dice > report.estimate_before + 0.2
    assert tuned.provenance["finetune"]["learned_dice"] == round(report.learned_dice, 4)
    assert tuned.provenance["finetune"]["slices"] == [1, 4]
    assert "finetuned_from" in tuned.provenance and "finetune" not in model.provenance


def test_the_estimate_predicts_the_dice_on_the_slices_that_were_not_annotated(trained):
    image, labels = toy_case(12, SHAPE)
    shifted = inverted(image)
    painted = [1, 3, 5, 8]
    # the tiny model needs a larger step than the hippocampus model's defaults to adapt within 60 iterations
    tuned, report = finetune(trained, shifted, painted_only(labels.array, painted), lr=1e-2, iterations=60)
    others = [s for s in range(SHAPE[2]) if s not in painted]
    truth_before = native_dice(trained, shifted.array[..., others], labels.array[..., others])["whole"]
    truth_after = native_dice(tuned, shifted.array[..., others], labels.array[..., others])["whole"]
    assert truth_after > truth_before + 0.3, "fine-tuning did not adapt the model to the inverted scan"
    assert report.recommended and report.advice.endswith("use the adapted model")
    assert abs(report.estimate_before - truth_before) < 0.05
    assert abs(report.estimate_after - truth_after) < 0.1


def test_a_fine_tune_that_makes_the_other_slices_worse_is_not_recommended(trained):
    image, labels = toy_case(12, SHAPE)
    # far too large a step: the adapted model forgets what it knew, on the annotated slices and elsewhere
    tuned, report = finetune(trained, image, painted_only(labels.array), lr=0.3, iterations=20)
    others = [s for s in range(SHAPE[2]) if s not in PAINTED]
    truth_before = native_dice(trained, image.array[..., others], labels.array[..., others])["whole"]
    truth_after = native_dice(tuned, image.array[..., others], labels.array[..., others])["whole"]
    assert truth_after < truth_before - 0.2
    assert report.estimate_after < report.estimate_before - 0.2
    assert report.learned_dice < report.estimate_before  # it did not even learn the painted slices
    assert not report.recommended
    assert report.advice.startswith("the adapted model is not expected to be better")
    assert report.advice.endswith("keep the current model")


def test_a_base_model_that_did_poorly_on_the_painted_slices_is_replaced_even_against_a_pessimistic_estimate():
    # a development run under motion: the cross-validation said the adapted model would lose (0.591 against
    # 0.689), and it gained 0.059 on the unpainted slices
    recommended, advice = advise(0.689, 0.591, 0.473, learned=0.85)
    assert recommended and advice.endswith("use the adapted model")
    assert "does poorly on the slices you painted (Dice 0.689" in advice
    # the same estimates from a base that did well on the painted slices: the estimate decides
    recommended, advice = advise(0.889, 0.791, 0.673, learned=0.95)
    assert not recommended and advice.endswith("keep the current model")
    # an adapted model that did not even learn the painted slices is no improvement, however poor the base
    assert not advise(0.689, 0.591, 0.473, learned=0.60)[0]


def test_one_annotated_slice_gives_no_estimate_and_no_recommendation(model):
    image, labels = toy_case(2, SHAPE)
    events = list(finetune_iter(model, image, painted_only(labels.array, [4]), iterations=3))
    assert [e.kind for e in events] == ["step"] * 3 + ["done"]  # no cross-validation to run
    _, report = finetune(model, image, painted_only(labels.array, [4]), iterations=3)
    assert report.estimate_after is None and not report.recommended
    assert "annotate 2 or more slices" in report.advice


def test_progress_counts_the_adapted_model_then_the_cross_validation(model):
    image, labels = toy_case(3, SHAPE)
    events = list(finetune_iter(model, image, painted_only(labels.array), iterations=4))
    steps = [e for e in events if e.kind == "step"]
    folds = [e for e in events if e.kind == "fold"]
    assert [(e.iteration, e.total) for e in steps] == [(i, 4) for i in range(1, 5)]
    assert all(e.loss is not None for e in steps)
    assert [(e.iteration, e.total) for e in folds] == [(i, 12) for i in range(1, 13)]  # 3 slices: 3 folds
    assert all(e.loss is None for e in folds) and events[-1].kind == "done"


def test_the_shared_defaults_apply_and_are_recorded_with_the_estimate(model):
    image, labels = toy_case(4, SHAPE)
    tuned, report = finetune(model, image, painted_only(labels.array), base_name="tiny")
    assert report.iterations == FINETUNE.iterations == len(report.losses)
    record = tuned.provenance["finetune"]
    assert record["settings"] == dataclasses.asdict(FINETUNE)
    assert record["base_model"] == "tiny" and len(record["base_weights_sha256"]) == 64
    assert record["slices"] == PAINTED and record["recommended"] == report.recommended
    assert record["estimate_before"] == round(report.estimate_before, 4)
    assert record["estimate_after"] == round(report.estimate_after, 4)


def test_settings_out_of_range_are_refused():
    with pytest.raises(MedNCAError, match="learning rate"):
        dataclasses.replace(FINETUNE, lr=0.0)
    with pytest.raises(MedNCAError, match="2 folds"):
        dataclasses.replace(FINETUNE, folds=1)


def test_finetune_is_cancellable_and_seeded(model):
    image, labels = toy_case(3)
    gen = finetune_iter(model, image, labels, iterations=50)
    first = next(gen)
    gen.close()
    assert first.iteration == 1 and first.total == 50
    a, ra = finetune(model, image, labels, slices=[2, 3], iterations=3)
    b, rb = finetune(model, image, labels, slices=[2, 3], iterations=3)
    assert same(weights(a), weights(b)) and ra.estimate_after == rb.estimate_after


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
