"""Segmenting a volume: geometry kept, progress reported, cancellable, reproducible; growth and quality maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednca.errors import VolumeError
from mednca.inference import (
    labels_from_probabilities,
    quality_iter,
    quality_map,
    record_growth,
    segment,
    segment_iter,
)
from mednca.model import MedNCA, NCAConfig
from mednca.progress import run_to_end
from mednca.quality import QualityCriteria
from mednca.volume import Volume


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = NCAConfig(channels=8, hidden=16, steps=(3, 4), input_size=(16, 16), output_channels=2,
                    class_names=("anterior", "posterior"))
    model = MedNCA(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 1.2, 2.0, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    return Volume(rng.normal(100, 20, size=(20, 24, 11)).astype(np.float32), affine)


def test_segmentation_keeps_the_scans_geometry(tiny_model, volume):
    result = segment(tiny_model, volume, seed=1)
    assert result.labels.shape == volume.shape
    np.testing.assert_array_equal(result.labels.affine, volume.affine)
    assert result.labels.array.dtype == np.uint8
    assert result.probabilities.shape == (2, *volume.shape)
    assert result.class_names == ("anterior", "posterior")
    np.testing.assert_array_equal(result.labels.array, labels_from_probabilities(result.probabilities))


def test_same_seed_same_result_and_other_seed_differs(tiny_model, volume):
    a = segment(tiny_model, volume, seed=3).probabilities
    b = segment(tiny_model, volume, seed=3).probabilities
    c = segment(tiny_model, volume, seed=4).probabilities
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_progress_counts_up_to_the_number_of_slices(tiny_model, volume):
    done = []
    result = run_to_end(segment_iter(tiny_model, volume, axis=1), done.append)
    assert [p.done for p in done] == sorted(p.done for p in done)
    assert done[-1].done == done[-1].total == volume.shape[1]
    assert result.axis == 1 and result.labels.shape == volume.shape


def test_cancelling_stops_the_work_and_restores_thread_settings(tiny_model, volume):
    before = torch.get_num_threads()
    gen = segment_iter(tiny_model, volume, axis=1, threads=1)  # 24 slices: more than one chunk
    first = next(gen)
    assert first.done < first.total
    gen.close()
    assert torch.get_num_threads() == before


def test_growth_ends_at_the_segmentation_and_records_every_step(tiny_model, volume):
    final = segment(tiny_model, volume, seed=5).probabilities
    frames = list(record_growth(tiny_model, volume, slices=[2, 7], seed=5, hidden=True))
    assert [(f.level, f.step) for f in frames] == [(0, i) for i in range(3)] + [(1, i) for i in range(4)]
    assert frames[0].probability.shape == (2, 20, 24, 2)
    assert frames[0].hidden.shape == (8 - 1 - 2, 2, 4, 4)
    np.testing.assert_allclose(frames[-1].probability, final[..., [2, 7]], atol=1e-5)


def test_growth_rejects_slices_outside_the_volume(tiny_model, volume):
    with pytest.raises(ValueError, match="slices"):
        next(record_growth(tiny_model, volume, slices=[11]))


def test_quality_map_measures_disagreement_between_runs(tiny_model, volume):
    report = quality_map(tiny_model, volume, runs=4, seed=2, criteria=QualityCriteria(slice_check=1e-9))
    assert report.mean.shape == report.std.shape == (2, *volume.shape)
    assert report.std.max() > 0 and report.std.min() >= 0
    scores = report.slice_scores
    assert report.flagged_slices == sorted(report.flagged_slices, key=lambda s: -scores[s])
    assert set(report.flagged_slices) == {i for i, s in enumerate(scores) if s > 1e-9}
    assert report.nqm > 0 and len(report.slice_nqm) == len(scores) == volume.shape[2]
    assert report.nqm == pytest.approx(report.slice_std.sum() / report.slice_mass.sum())
    with pytest.raises(ValueError, match="2 runs"):
        next(quality_iter(tiny_model, volume, runs=1))


def test_quality_map_of_a_deterministic_model_is_zero(tiny_model, volume):
    report = quality_map(tiny_model, volume, runs=3, fire_rate=0.0)  # every cell fires: no randomness left
    assert report.nqm == 0.0 and report.flagged_slices == []


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, bool])
def test_integer_and_bool_scans_segment(tiny_model, volume, dtype):
    data = (volume.array > 100) if dtype is bool else np.clip(volume.array, 0, 255).astype(dtype)
    result = segment(tiny_model, Volume(data, volume.affine))
    assert result.labels.shape == volume.shape


def test_nan_voxels_are_handled(tiny_model, volume):
    data = volume.array.copy()
    data[:3] = np.nan
    data[5, 5, 5] = np.inf
    result = segment(tiny_model, Volume(data, volume.affine))
    assert np.isfinite(result.probabilities).all()


def test_an_empty_scan_is_refused_rather_than_given_labels(tiny_model):
    with pytest.raises(VolumeError, match="the image is constant"):
        segment(tiny_model, Volume(np.zeros((30, 40, 6), np.float32), np.eye(4)))


def test_multiclass_labels_take_the_most_probable_class_where_the_structure_is_likely():
    prob = np.array([[0.9, 0.2, 0.6, 0.45, 0.2], [0.3, 0.2, 0.7, 0.44, 0.25]], np.float32)
    # the last but one voxel lies on the border of two parts: surely the structure, though neither part passes 0.5
    np.testing.assert_array_equal(labels_from_probabilities(prob), [1, 0, 2, 1, 0])
    np.testing.assert_array_equal(labels_from_probabilities(prob[:1]), [1, 0, 1, 0, 0])


def test_training_evaluation_labels_voxels_as_inference_does():
    from mednca.training import predict_masks

    prob = np.random.default_rng(0).uniform(0.01, 0.99, (2, 50)).astype(np.float32)
    masks = predict_masks(torch.logit(torch.from_numpy(prob))[None]).numpy()[0]  # [K, voxels]
    labels = labels_from_probabilities(prob)
    np.testing.assert_array_equal(masks, np.stack([labels == 1, labels == 2]))
