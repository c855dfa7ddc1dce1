"""Training augmentation: MRI artefacts on model-space slices, at a chosen share, seeded, and absent unless asked."""

from __future__ import annotations

import pytest
import torch

from mednca.augmentation import TRAINING_ARTEFACTS, add_artefacts, apply_artefact
from mednca.preprocess import rescale_percentiles


def slices(n=8, size=32, seed=0) -> torch.Tensor:
    """Patches of random brightness with sharp edges (detail to lose), rescaled as preprocessing does."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 8, 8), generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    return rescale_percentiles(x, (0.5, 99.5), per_slice=True)


def test_no_artefacts_leaves_slices_and_random_stream_untouched():
    x, gen = slices(), torch.Generator().manual_seed(1)
    state = gen.get_state()
    assert add_artefacts(x, 0.0, gen) is x
    assert torch.equal(gen.get_state(), state)  # a recipe without artefacts trains as before they existed


def test_the_share_decides_how_many_slices_change_and_every_result_is_a_model_input():
    x = slices(n=200)
    out = add_artefacts(x, 0.3, torch.Generator().manual_seed(2))
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert 40 <= int(changed.sum()) <= 80
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    again = add_artefacts(x, 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", TRAINING_ARTEFACTS)
def test_each_artefact_corrupts_the_slice_in_its_own_way(name):
    x = slices(n=1)[0, 0]
    y = apply_artefact(x, name, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y - x).abs().mean() > 0.01
    diff = torch.fft.fft2(y - x).abs().flatten()
    fx, fy = torch.fft.fft2(x).abs().flatten(), torch.fft.fft2(y).abs().flatten()
    if name == "inversion":
        assert torch.allclose(y, 1 - x)
    elif name == "spike":  # all the change is one stripe pattern: one frequency and its mirror
        assert diff.topk(2).values.sum() > 0.99 * diff.sum()
    elif name in ("blur", "thick"):  # detail is lost, and nothing is added
        assert fy[1:].sum() < 0.9 * fx[1:].sum()
    elif name == "noise":  # fine detail is added where the slice had little
        f = torch.fft.fftfreq(x.shape[0]).abs()
        high = ((f[:, None] >= 0.25) | (f[None, :] >= 0.25)).flatten()
        assert fy[high].sum() > 1.5 * fx[high].sum()
