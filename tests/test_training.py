"""Training: learns, is reproducible, can be cancelled and resumed, and validates on unseen cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from training_support import TINY, same, toy_case, weights

from mednca.data import build_slices, load_cases, split_cases
from mednca.errors import MedNCAError
from mednca.model import MedNCA
from mednca.progress import run_to_end
from mednca.training import Recipe, train, train_iter
from mednca.volume import write_volume

FAST = Recipe(lr=1e-2, warmup=5, crop=8)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    return [toy_case(s) for s in range(6)]


def run(toy, **kw):
    args = dict(config=TINY, recipe=FAST, iterations=12, batch_size=4, val_fraction=0.34, eval_every=6,
                log_every=1, eval_slices=None)
    return train_iter(toy, **{**args, **kw})


def test_loss_goes_down_and_model_learns(toy):
    events = list(run(toy, iterations=150, recipe=Recipe(lr=2e-2, warmup=5, crop=8)))
    losses = [e.loss for e in events if e.kind == "step"]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:10])
    evals = [e.val_dice for e in events if e.kind == "eval"]
    assert evals[-1]["whole"] > 0.5
    assert events[-1].kind == "done"


def test_same_seed_same_weights(toy):
    a, b = train(toy, **_short()), train(toy, **_short())
    c = train(toy, **_short(seed=1))
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


def _short(**kw):
    return {**dict(config=TINY, recipe=FAST, iterations=6, batch_size=4, val_fraction=0.34, eval_every=3), **kw}


def test_cancel_leaves_init_model_untouched(toy):
    init = MedNCA(TINY)
    before = weights(init)
    gen = run(toy, init_model=init)
    for event in gen:
        if event.iteration >= 5:
            break
    gen.close()
    assert same(before, weights(init))


def test_a_model_trained_from_another_records_its_start_but_not_its_results(toy):
    init = MedNCA(TINY)
    init.provenance = {"source": "shipped", "iterations": 500, "validation_dice_native": {"whole": 0.99}}
    model = train(toy, **_short(init_model=init))
    assert model.provenance["started_from"] == init.provenance
    assert "validation_dice_native" not in model.provenance  # that Dice was measured on other weights
    assert model.provenance["iterations"] == 6


def test_resume_continues_where_the_checkpoint_stopped(toy, tmp_path):
    straight = train(toy, **_short(iterations=10))
    ckpt = tmp_path / "state.safetensors"
    gen = run(toy, iterations=10, checkpoint_path=ckpt, checkpoint_every=4)
    for event in gen:
        if event.kind == "checkpoint":
            break
    gen.close()
    assert event.iteration == 4 and ckpt.exists()
    resumed_events = []
    gen = run(toy, iterations=10, checkpoint_path=ckpt, checkpoint_every=4, resume=True)
    resumed = run_to_end(gen, resumed_events.append)
    assert resumed_events[0].iteration == 5
    assert same(weights(straight), weights(resumed))


def test_resume_refuses_another_setup(toy, tmp_path):
    ckpt = tmp_path / "state.safetensors"
    train(toy, **_short(checkpoint_path=ckpt, checkpoint_every=3))
    with pytest.raises(MedNCAError, match="different training setup"):
        train(toy, **_short(checkpoint_path=ckpt, resume=True, batch_size=2))


def test_validation_cases_never_train(toy):
    train_idx, val_idx = split_cases(50, 0.2, seed=3)
    assert not set(train_idx) & set(val_idx) and len(val_idx) == 10 and len(train_idx) == 40
    assert split_cases(50, 0.2, seed=3) == (train_idx, val_idx)
    model = train(toy, **_short())
    val = model.provenance["validation_cases"]
    assert val and len(val) < len(toy)
    slices = build_slices(load_cases(toy), TINY, model.preprocessing)
    val_index = [slices.case_ids.index(c) for c in val]
    assert set(val_index) == set(split_cases(len(toy), 0.34, 0)[1])


def test_decathlon_folder(tmp_path, toy):
    entries = []
    for i, (img, lab) in enumerate(toy[:2]):
        write_volume(img, tmp_path / "imagesTr" / f"case_{i}.nii.gz")
        write_volume(lab, tmp_path / "labelsTr" / f"case_{i}.nii.gz")
        entries.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    with pytest.raises(MedNCAError, match="dataset.json"):
        load_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries}))
    slices = build_slices(load_cases(tmp_path), TINY, MedNCA(TINY).preprocessing)
    assert slices.case_ids == ["case_0", "case_1"]
    assert slices.images.shape == (12, 1, 16, 16) and slices.labels.shape == (12, 2, 16, 16)
    assert set(slices.labels.unique().tolist()) == {0, 1}


def test_labels_beyond_the_classes_are_refused():
    img, lab = toy_case(0)
    lab.array[0, 0, 0] = 3
    with pytest.raises(MedNCAError, match="class 3"):
        train([(img, lab), toy_case(1)], **_short())
