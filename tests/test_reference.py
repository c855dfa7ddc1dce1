"""Conformance with the Med-NCA authors' own results (../shared/reference/mednca_hippocampus): the imported
checkpoint must reproduce their segmentation, their run-to-run agreement and their quality score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednca.inference import segment, slice_generators
from mednca.preprocess import Preprocessing, prepare_slices
from mednca.volume import read_volume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def authors(reference_dir):
    load = lambda name: np.load(reference_dir / f"hippocampus_374_{name}.npy")  # noqa: E731
    return load("inputs64"), load("labels64") > 0, load("logits64_10seeds")


@pytest.fixture(scope="module")
def ten_runs(reference_model, authors):
    """Our logits for seeds 0..9 on the authors' preprocessed inputs, all runs in one batch."""
    inputs = torch.from_numpy(authors[0])[:, None]
    n = inputs.shape[0]
    gens = [g for seed in range(10) for g in slice_generators(seed, 0, range(n))]
    with torch.no_grad():
        logits = reference_model(inputs.repeat(10, 1, 1, 1), gens)
    return logits[:, 0].reshape(10, n, 64, 64).numpy()


def test_preprocessing_matches_the_authors(hippocampus_dir, reference_model, authors):
    volume = read_volume(hippocampus_dir / "imagesTr" / "hippocampus_374.nii.gz")
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume.array.astype(np.float32), 2, 0)))
    ours = prepare_slices(slices, (64, 64), reference_model.preprocessing)[:, 0].numpy()
    assert reference_model.preprocessing == Preprocessing(axis=2, resize="bicubic", percentiles=(0.5, 99.5))
    np.testing.assert_allclose(ours, authors[0], atol=1e-5)


def test_hard_dice_per_seed_matches_the_authors(ten_runs, authors):
    scores = [dice(ten_runs[s] > 0, authors[1]) for s in range(3)]
    assert min(scores) >= 0.895, scores  # authors: 0.8999-0.9041


def test_mean_logits_agree_with_the_authors(ten_runs, authors):
    r = np.corrcoef(ten_runs.mean(0).ravel(), authors[2].mean(0).ravel())[0, 1]
    assert r >= 0.99


def test_quality_score_matches_the_authors(ten_runs):
    prob = 1.0 / (1.0 + np.exp(-ten_runs.astype(np.float64)))
    nqm = prob.std(0).sum() / prob.mean(0).sum()
    assert 0.035 <= nqm <= 0.06  # authors: 0.0453


def test_full_pipeline_at_native_resolution(hippocampus_dir, reference_model):
    volume = read_volume(hippocampus_dir / "imagesTr" / "hippocampus_374.nii.gz")
    label = read_volume(hippocampus_dir / "labelsTr" / "hippocampus_374.nii.gz").array > 0
    result = segment(reference_model, volume, seed=0)
    assert result.labels.shape == volume.shape
    np.testing.assert_array_equal(result.labels.affine, volume.affine)
    assert dice(result.labels.array > 0, label) >= 0.89  # authors' model, their best mapping: 0.904
