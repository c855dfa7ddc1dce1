"""A model that reads the neighbouring slices (``Preprocessing.context``) gets the real neighbours of each slice,
in the model's slice order, along the axis it slices, wherever the slices come from: inference on a scan stored
in any orientation, training data and its augmentation, fine-tuning on a few annotated slices, model files."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from cli_support import make_task, tiny_model_file
from orientation_support import reoriented
from training_support import TINY, toy_case

from mednca.augmentation import TRAINING_ARTEFACTS, add_artefacts, apply_artefact, rescale_each, thicken_across
from mednca.checkpoint import load_model_file, read_metadata, save_model
from mednca.cli import main
from mednca.data import case_slices, load_cases
from mednca.errors import MedNCAError
from mednca.finetuning import finetune
from mednca.inference import segment, slice_axis
from mednca.model import MedNCA
from mednca.model_schema import SchemaError
from mednca.preprocess import Preprocessing, with_neighbours
from mednca.registry import list_models, save_user_model
from mednca.training import Recipe, native_masks, new_model, train
from mednca.volume import Volume

CONTEXT = Preprocessing(context=1)
WIDE = replace(TINY, input_channels=3)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared machine: one torch thread."""


@pytest.fixture(scope="module")
def model():
    """Random weights are neither symmetric between the slice before and the slice after nor blind to them."""
    return new_model(WIDE, CONTEXT, seed=3).eval()


def scan(shape=(20, 18, 12), seed=0) -> Volume:
    """Smooth blobs on noise, RAS, anisotropic voxels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    image = np.exp(-((grid - rng.uniform(-0.5, 0.5, (3, 1, 1, 1))) ** 2).sum(0) * 4) + rng.normal(0, 0.05, shape)
    return Volume(image.astype(np.float32), np.diag([0.9, 1.1, 2.5, 1.0]))


def test_each_slice_sits_between_its_neighbours_and_the_nearest_slice_stands_in_beyond_the_ends():
    slices = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    stacked = with_neighbours(slices, 2)
    assert stacked.shape == (5, 5, 2, 2)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 4],
                                            [2, 3, 4, 4, 4]]
    assert with_neighbours(slices, 0) is slices


@pytest.mark.parametrize("codes", ["LPS", "RAI", "ASL"])
def test_a_scan_stored_in_any_orientation_gets_the_same_neighbours_and_labels(model, codes):
    volume = scan()
    canonical = segment(model, volume, seed=1)
    other = reoriented(volume, codes)
    result = segment(model, other, seed=1)
    back = reoriented(Volume(result.probabilities[0], other.affine), "RAS").array
    np.testing.assert_allclose(back, canonical.probabilities[0], atol=1e-6)
    assert np.array_equal(reoriented(result.labels, "RAS").array, canonical.labels.array)


@pytest.mark.parametrize(("codes", "axis"), [("RAS", None), ("LPS", None), ("RAI", None), ("LPS", 0)])
def test_a_slice_is_read_by_itself_and_its_two_neighbours_along_the_slicing_axis_only(model, codes, axis):
    volume = reoriented(scan(), codes)
    along = slice_axis(model, volume) if axis is None else axis
    j = volume.shape[along] // 2
    changed = volume.array.copy()
    np.moveaxis(changed, along, 0)[j] += np.random.default_rng(1).normal(0, 0.3, np.delete(volume.shape, along))
    before = segment(model, volume, axis=axis, seed=2).probabilities
    after = segment(model, volume.like(changed), axis=axis, seed=2).probabilities
    differs = np.abs(np.moveaxis(after - before, along + 1, 0)).reshape(volume.shape[along], -1).max(1) > 1e-6
    assert np.flatnonzero(differs).tolist() == [j - 1, j, j + 1]


def test_training_slices_carry_the_neighbours_inference_gives_them(model):
    volume = scan()
    image, labels = volume.array, (volume.array > 0.5).astype(np.uint8)
    inputs, onehot = case_slices(image, labels, WIDE, CONTEXT)
    alone, _ = case_slices(image, labels, TINY, Preprocessing())
    assert inputs.shape == (12, 3, 16, 16) and onehot.shape == (12, 2, 16, 16)
    assert torch.equal(inputs[:, 1:2], alone)
    assert torch.equal(inputs[1:, 0], alone[:-1, 0]) and torch.equal(inputs[:-1, 2], alone[1:, 0])


def test_a_thickened_slice_gets_the_neighbours_the_same_thick_scan_shows():
    # a scan whose slices change linearly from slice to slice looks the same when scanned thick and
    # interpolated back, away from its ends: the neighbours must come out as the slices beside
    a, b = torch.rand(2, 1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    z = torch.arange(30.0).view(30, 1, 1, 1, 1)
    stack = with_neighbours((a + z * b)[:, 0], 1)
    case_index = torch.zeros(30, dtype=torch.long)
    idx = torch.arange(8, 22)
    out = thicken_across(stack, case_index, idx, 1.0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, rescale_each(stack[idx]), atol=1e-5, rtol=0)
    # and a step between two halves blurs at the same place of every neighbour's own position
    step = with_neighbours((a + (z >= 15).float() * b)[:, 0], 1)
    out = thicken_across(step, case_index, idx, 1.0, torch.Generator().manual_seed(4))
    single = thicken_across(step[:, 1:2], case_index, idx, 1.0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out[:, 1:2], single)  # the centre as a one-slice model trains on it


@pytest.mark.parametrize("name", TRAINING_ARTEFACTS)
def test_an_artefact_is_drawn_once_for_a_slice_and_its_neighbours(name):
    x = torch.rand(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alone = apply_artefact(x, name, torch.Generator().manual_seed(7))
    stacked = apply_artefact(torch.stack([x, x, x]), name, torch.Generator().manual_seed(7))
    if name == "noise":  # each slice of a scan has its own noise
        assert not torch.equal(stacked[0], stacked[2])
        return
    for channel in stacked:
        torch.testing.assert_close(channel, alone)


def test_artefacts_on_training_stacks_are_rescaled_channel_by_channel():
    stack = with_neighbours(torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1)), 1)
    out = add_artefacts(stack, 1.0, torch.Generator().manual_seed(2))
    assert out.shape == stack.shape
    assert torch.allclose(out.amin((-2, -1)), torch.zeros(6, 3))
    assert torch.allclose(out.amax((-2, -1)), torch.ones(6, 3))


def test_a_model_reads_as_many_input_channels_as_its_preprocessing_gives():
    with pytest.raises(SchemaError, match=r"input_channels is 1, but preprocessing.context 1 .* gives 3"):
        MedNCA(TINY, preprocessing=CONTEXT)
    with pytest.raises(MedNCAError, match="input_channels is 3, but preprocessing.context 0"):
        train([toy_case(0)], config=WIDE, iterations=1)


def test_the_model_file_records_the_neighbours_and_a_one_slice_file_stays_as_it_was(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDNCA_MODELS_DIR", str(tmp_path))
    loaded = load_model_file(save_user_model(model, "wide"))
    assert "reads 1 neighbouring slice on each side" in next(e for e in list_models() if e.name == "wide").summary
    assert loaded.preprocessing == CONTEXT and loaded.config.input_channels == 3
    volume = scan()
    np.testing.assert_array_equal(segment(loaded, volume).probabilities, segment(model, volume).probabilities)
    plain = save_model(new_model(TINY, Preprocessing(), 0), tmp_path / "plain.safetensors")
    assert "context" not in read_metadata(plain)["preprocessing"]


def test_chosen_slices_are_predicted_with_their_neighbours_from_the_whole_scan():
    # with every cell firing at each step a run is deterministic, so a few slices must come out as in the whole
    steady = new_model(replace(WIDE, fire_rate=0.0), CONTEXT, seed=5).eval()
    volume = scan()
    labels = (volume.array > 0.5).astype(np.uint8)
    whole, _ = native_masks(steady, volume.array, labels)
    some, truth = native_masks(steady, volume.array, labels, slices=[0, 5, 6, 11])
    assert torch.equal(some, whole[[0, 5, 6, 11]]) and truth.shape == some.shape


def test_training_and_fine_tuning_a_model_that_reads_neighbours():
    cases = [toy_case(i, shape=(20, 20, 8)) for i in range(3)]
    trained = train(cases, config=WIDE, preprocessing=CONTEXT, iterations=6, batch_size=4, val_fraction=0.34,
                    eval_every=3, recipe=None)
    assert trained.config.input_channels == 3 and trained.preprocessing.context == 1
    image, labels = cases[0]
    tuned, report = finetune(trained, image, labels.array, slices=[2, 4], iterations=3, batch_size=2)
    assert tuned.preprocessing == CONTEXT and report.slices == [2, 4]
    assert segment(tuned, image).labels.shape == image.shape


def test_training_data_with_augmentation_keeps_the_stack(tmp_path):
    cases = load_cases([toy_case(i, shape=(20, 20, 8)) for i in range(2)])
    recipe = Recipe(crop=8, artefacts=0.5, thick_across=0.5, spatial=0.5)
    trained = train(cases, config=WIDE, preprocessing=CONTEXT, recipe=recipe, iterations=4, batch_size=4,
                    val_fraction=0.5, eval_every=2)
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_mednca_train_context_makes_a_model_that_reads_neighbours(tmp_path, capsys):
    task = make_task(tmp_path / "task")
    out = tmp_path / "wide.safetensors"
    assert main(["train", str(task), "-o", str(out), "--context", "1", "--iterations", "2", "--batch-size", "2",
                 "--val-fraction", "0.34", "--eval-every", "2"]) == 0
    meta = read_metadata(out)
    assert meta["preprocessing"]["context"] == 1 and meta["architecture"]["input_channels"] == 3
    tiny = tiny_model_file(tmp_path / "tiny.safetensors")
    assert main(["train", str(task), "-o", str(tmp_path / "x.safetensors"), "--init", str(tiny),
                 "--context", "1", "--iterations", "2"]) == 1
    assert "reads 0 neighbouring slices on each side, not --context 1" in capsys.readouterr().err
