"""Training augmentation: MRI artefacts on model-space slices, slices thickened across the slice axis, and new
shapes and poses, at a chosen share, seeded, and absent unless asked."""

from __future__ import annotations

import pytest
import torch

from mednca.augmentation import TRAINING_ARTEFACTS, add_artefacts, apply_artefact, deform, thicken_across
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


def stack(cases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cases of slices ``[n, 1, H, W]`` as one set with the case of each slice; case ids out of order, as a
    subset of cases numbers them."""
    ids = [2, 0, 1][: len(cases)]
    return torch.cat(cases), torch.cat([torch.full((len(c),), i) for c, i in zip(cases, ids, strict=True)])


def test_no_thickening_returns_the_slices_and_leaves_the_random_stream_untouched():
    x, case = stack([slices(n=10), slices(n=10, seed=1)])
    gen, idx = torch.Generator().manual_seed(1), torch.tensor([0, 5, 12, 19])
    state = gen.get_state()
    assert torch.equal(thicken_across(x, case, idx, 0.0, gen), x[idx])
    assert torch.equal(gen.get_state(), state)


def test_a_thickened_slice_interpolates_its_neighbours_linearly():
    """Where the anatomy changes linearly across slices, linear interpolation from any 2-5 times coarser grid
    gives back the slice itself: wrong weights or positions would not."""
    base, change = slices(n=2, seed=4)
    z = torch.arange(30, dtype=torch.float32).view(-1, 1, 1, 1)
    x = base + 0.1 * z * change  # slice z of a case whose anatomy moves steadily
    case = torch.zeros(30, dtype=torch.long)
    idx = torch.arange(6, 24)  # 6 slices or more from the ends: no clamping
    out = thicken_across(x, case, idx, 1.0, torch.Generator().manual_seed(5))
    assert torch.allclose(out, rescale_percentiles(x[idx], (0.5, 99.5), per_slice=True), atol=1e-5)


def test_thickening_blends_only_slices_of_the_same_case():
    """A case whose slices all show one pattern keeps showing it, even at its first and last slice, next to
    cases of another pattern."""
    a, b = slices(n=1, seed=6), slices(n=1, seed=7)
    x, case = stack([b.repeat(8, 1, 1, 1), a.repeat(6, 1, 1, 1), b.repeat(8, 1, 1, 1)])
    idx = torch.arange(8, 14)  # every slice of the middle case
    out = thicken_across(x, case, idx, 1.0, torch.Generator().manual_seed(8))
    assert torch.allclose(out, a.expand(6, -1, -1, -1), atol=1e-5)


def test_the_thickened_share_is_seeded_and_changes_distinct_slices():
    x, case = stack([slices(n=40, seed=9), slices(n=40, seed=10)])
    idx = torch.randint(80, (200,), generator=torch.Generator().manual_seed(11))
    out = thicken_across(x, case, idx, 0.3, torch.Generator().manual_seed(12))
    changed = (out - x[idx]).abs().flatten(1).amax(1) > 1e-4
    assert 40 <= int(changed.sum()) <= 80
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, thicken_across(x, case, idx, 0.3, torch.Generator().manual_seed(12)))


def disc_labels(n=40, size=32) -> torch.Tensor:
    """Two-class masks ``[N, 2, H, W]``: the left and right halves of an off-centre disc."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - 12) ** 2 + (xx - 15) ** 2 < 36
    left, right = disc & (xx < 15), disc & (xx >= 15)
    return torch.stack((left, right)).expand(n, 2, size, size).to(torch.uint8).clone()


def test_no_deformation_leaves_slices_labels_and_random_stream_untouched():
    x, lab, gen = slices(), disc_labels(8), torch.Generator().manual_seed(1)
    state = gen.get_state()
    out, out_lab = deform(x, lab, 0.0, gen)
    assert out is x and out_lab is lab
    assert torch.equal(gen.get_state(), state)  # a recipe without it trains as before it existed


def test_a_deformed_slice_keeps_its_labels_on_the_structure_they_mark():
    lab = disc_labels()
    image = lab.float().sum(1, keepdim=True)  # the structure is bright where its labels are
    out, out_lab = deform(image, lab, 0.5, torch.Generator().manual_seed(3))
    moved = (out_lab != lab).flatten(1).any(1)
    assert 10 <= int(moved.sum()) <= 30  # about half of the 40 slices
    assert torch.equal(out[~moved], image[~moved]) and torch.equal(out_lab[~moved], lab[~moved])
    assert out_lab.dtype == lab.dtype and set(out_lab.unique().tolist()) <= {0, 1}
    assert not (out_lab[:, 0].bool() & out_lab[:, 1].bool()).any()  # still one class per pixel
    mask = out_lab.bool().any(1)
    assert (out[:, 0][mask] > 0.5).float().mean() > 0.97  # labels still sit on the bright structure
    assert (out[:, 0][~mask] < 0.5).float().mean() > 0.99
    area = lab.bool().any(1).flatten(1).sum(1).float()
    ratio = mask.flatten(1).sum(1).float() / area
    assert ((ratio > 0.75) & (ratio < 1.3)).all()  # up to 10 % per axis: the structure keeps about its size
