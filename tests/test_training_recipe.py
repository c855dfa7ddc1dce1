"""Recipe settings: the authors' zero-initialised last layer, artefacts, thickened slices, and checkpoints saved
before a setting existed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from training_support import TINY, same, toy_case, weights

from mednca.checkpoint import load_model_file
from mednca.errors import MedNCAError
from mednca.model import MedNCA
from mednca.progress import run_to_end
from mednca.training import AUTHORS_RECIPE, Recipe, segmentation_loss, train, train_iter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    return [toy_case(s) for s in range(6)]


def short(**kw):
    return {**dict(config=TINY, iterations=1, batch_size=4, val_fraction=0.34, eval_every=1), **kw}


def fc1_size(model: MedNCA) -> float:
    return max(level.fc1.weight.abs().max().item() for level in model.backbones)


def test_zero_fc1_starts_every_cell_with_no_change(toy):
    lr = 1e-5  # Adam moves each weight by about lr a step
    assert AUTHORS_RECIPE.zero_fc1 and not Recipe().zero_fc1
    assert fc1_size(train(toy, **short(recipe=Recipe(lr=lr, zero_fc1=True)))) <= 2 * lr
    assert fc1_size(train(toy, **short(recipe=Recipe(lr=lr)))) > 100 * lr
    start = MedNCA(TINY)
    tuned = train(toy, **short(recipe=Recipe(lr=lr, zero_fc1=True), init_model=start))  # a start keeps its weights
    assert fc1_size(tuned) > 100 * lr


def test_a_checkpoint_from_before_a_recipe_setting_resumes(toy, tmp_path):
    """A checkpoint whose recorded recipe lacks a setting added since trained with that setting's default; one
    recording the whole-structure term as on/off (stages 8 and 9 of the default) resumes with weight 1."""
    ckpt = tmp_path / "state.safetensors"
    args = short(recipe=Recipe(lr=1e-2, warmup=2, crop=8, whole_dice=1.0), iterations=6, eval_every=100,
                 checkpoint_every=3)
    straight = train(toy, **args)
    gen = train_iter(toy, **args, checkpoint_path=ckpt)
    for event in gen:
        if event.kind == "checkpoint":
            break
    gen.close()
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["mednca_training"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for added in ("zero_fc1", "artefacts", "thick_across"):
        del meta["setup"]["recipe"][added]
    meta["setup"]["recipe"]["whole_dice"] = True
    save_file(tensors, ckpt, metadata={"mednca_training": json.dumps(meta)})
    resumed = train(toy, **args, checkpoint_path=ckpt, resume=True)
    assert resumed.provenance["iterations"] == 6
    assert same(weights(resumed), weights(straight))


@pytest.mark.parametrize(("setting", "message"), [("artefacts", "artefacts"), ("thick_across", "thickened slices")])
def test_corrupting_a_share_changes_the_training_and_a_share_outside_0_to_1_is_refused(toy, setting, message):
    plain = train(toy, **short(iterations=3))
    corrupted = train(toy, **short(iterations=3, recipe=Recipe(**{setting: 0.9})))
    assert corrupted.provenance["recipe"][setting] == 0.9
    assert not same(weights(plain), weights(corrupted))
    with pytest.raises(MedNCAError, match=f"{message} must be 0 to 1"):
        train(toy, **short(recipe=Recipe(**{setting: 1.5})))


def test_a_negative_whole_structure_weight_is_refused(toy):
    with pytest.raises(MedNCAError, match="whole structure's Dice weight must be 0 to 100, not -1"):
        train(toy, **short(recipe=Recipe(whole_dice=-1.0)))


def test_the_final_model_records_its_own_validation_dice_not_the_best_checkpoints(toy, tmp_path):
    """The best checkpoint is saved as training goes; the model returned at the end holds the final weights,
    so its file must state their Dice, else a user reads the best's figure on weights that did worse."""
    best_path = tmp_path / "best.safetensors"
    args = short(recipe=Recipe(lr=5e-2, warmup=1), iterations=8, eval_every=1, seed=0)
    events = []
    final = run_to_end(train_iter(toy, **args, best_path=best_path), events.append)
    evals = [{k: round(v, 4) for k, v in e.val_dice.items()} for e in events if e.kind == "eval"]
    wholes = [d["whole"] for d in evals]
    assert max(wholes) > wholes[-1]  # the case this test is about: the best came before the end
    assert final.provenance["validation_dice_model_space"] == evals[-1]
    assert load_model_file(best_path).provenance["validation_dice_model_space"]["whole"] == max(wholes)


def split_disc() -> torch.Tensor:
    """Two classes ``[1, 2, 32, 32]`` that meet: the left and right halves of a disc."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 100
    return torch.stack((disc & (xx < 16), disc & (xx >= 16)))[None].float()


def test_the_whole_structure_term_weighs_a_miss_at_the_outline_more_against_a_mix_up_inside():
    target = split_disc()
    seam = target.clone()  # the column of class 0 next to the seam put in class 1: the outline is right
    seam[0, 1, :, 15] = seam[0, 0, :, 15]
    seam[0, 0, :, 15] = 0
    outline = target.clone()  # as many pixels of class 0 missed at the outline instead
    edge = (target[0, 0] > 0) & ~(torch.nn.functional.max_pool2d(-target[0:1, 0:1], 3, 1, 1)[0, 0] < 0)
    missed = edge.nonzero()[: int(target[0, 0, :, 15].sum())]
    outline[0, 0, missed[:, 0], missed[:, 1]] = 0
    assert outline.sum() == target.sum() - seam[0, 1, :, 15].sum()

    def ratio(whole):  # the cost of the outline miss over the cost of the mix-up
        loss = {name: segmentation_loss((pred * 2 - 1) * 2, target, whole=whole).item()
                for name, pred in (("seam", seam), ("outline", outline), ("right", target))}
        return (loss["outline"] - loss["right"]) / (loss["seam"] - loss["right"])

    assert ratio(1.0) > ratio(0.0) * 1.1  # 0.60 -> 0.69: BCE, the same either way, is most of the loss
    assert ratio(3.0) > ratio(1.0) * 1.1  # a heavier whole term: the outline counts for more still
    one_class = target.amax(1, keepdim=True)
    assert segmentation_loss(one_class, one_class, whole=1.0) == segmentation_loss(one_class, one_class)


def test_a_whole_term_of_weight_one_is_one_more_term_of_the_dice_mean():
    # stage 8 of the default was trained with the whole term as a plain (K + 1)-th term; the weight keeps that
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 8, 8), (torch.rand(2, 2, 8, 8) > 0.5).float()
    p = torch.sigmoid(logits)
    union = 1 - (1 - p).prod(1, keepdim=True)
    p3, t3 = torch.cat((p, union), 1), torch.cat((target, target.amax(1, keepdim=True)), 1)
    dice = (2 * (p3 * t3).sum((0, 2, 3)) + 1) / (p3.sum((0, 2, 3)) + t3.sum((0, 2, 3)) + 1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()
    assert torch.allclose(segmentation_loss(logits, target, whole=1.0), expected, rtol=1e-6)
