"""Seeded MRI artefacts: each corrupts the scan on its own grid, reproducibly, at a strength relative to the scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednca.artefacts import ARTEFACTS, apply_artefact, artefact_seed, parse_artefacts, scan_under
from mednca.errors import MedNCAError
from mednca.volume import Volume

SEEDED = tuple(a for a in ARTEFACTS if a != "inversion")  # inversion has nothing to draw


def phantom(dtype=np.float32) -> Volume:
    """A small scan: a bright ellipsoid with a dark core on a dim background, with noise, on an oblique
    anisotropic grid (so a lost or altered affine would show)."""
    i, j, k = np.meshgrid(np.arange(20), np.arange(18), np.arange(12), indexing="ij")
    r = ((i - 10) / 7) ** 2 + ((j - 9) / 6) ** 2 + ((k - 6) / 4) ** 2
    image = 100 + 500 * (r < 1) - 250 * (r < 0.3) + np.random.default_rng(0).normal(0, 10, r.shape)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[1.2 * c, -s, 0, -12.0], [1.2 * s, c, 0, 7.5], [0, 0, 1.5, 30.0], [0, 0, 0, 1]])
    return Volume(image.astype(dtype), affine)


@pytest.fixture(scope="module")
def scan():
    return phantom()


@pytest.mark.parametrize("name", ARTEFACTS)
def test_each_artefact_changes_the_scan_on_its_own_grid(scan, name):
    out = apply_artefact(scan, name, seed=1)
    assert out.shape == scan.shape and out.array.dtype == np.float32
    np.testing.assert_array_equal(out.affine, scan.affine)
    assert np.isfinite(out.array).all()
    change = np.abs(out.array - scan.array).mean() / np.abs(scan.array).mean()
    assert change > 0.01, f"{name} changed the scan by only {change:.4f} of its mean intensity"
    np.testing.assert_array_equal(scan.array, phantom().array)  # the input is left as it was


@pytest.mark.parametrize("name", SEEDED)
def test_the_same_seed_gives_the_same_scan_and_another_seed_another(scan, name):
    state = torch.random.get_rng_state()
    first = apply_artefact(scan, name, seed=7).array
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(123)  # whatever the global state, the seed alone decides
    np.testing.assert_array_equal(apply_artefact(scan, name, seed=7).array, first)
    assert not np.array_equal(apply_artefact(scan, name, seed=8).array, first)


@pytest.mark.parametrize("name", ARTEFACTS)
def test_strength_is_relative_to_the_scans_brightness(name):
    """A scan stored in other units (here x1000) is corrupted the same way: noise is not fixed in raw units."""
    small = phantom()
    large = Volume(small.array * 1000, small.affine)
    a, b = apply_artefact(small, name, 3).array, apply_artefact(large, name, 3).array
    np.testing.assert_allclose(b, a * 1000, rtol=1e-3, atol=1e-3 * 1000 * np.abs(a).max())


def test_inversion_flips_intensities_within_the_scans_range(scan):
    out = apply_artefact(scan, "inversion", seed=0).array
    x = scan.array
    np.testing.assert_allclose(out, x.max() + x.min() - x, rtol=1e-6)
    assert out.min() == pytest.approx(x.min()) and out.max() == pytest.approx(x.max())
    np.testing.assert_array_equal(apply_artefact(scan, "inversion", seed=5).array, out)  # no randomness


def test_integer_scans_come_back_as_float32():
    out = apply_artefact(phantom(np.int16), "noise", seed=0)
    assert out.array.dtype == np.float32 and out.shape == (20, 18, 12)


def test_an_unknown_artefact_is_named_with_the_valid_ones(scan):
    with pytest.raises(MedNCAError, match=r"unknown artefact 'ghost'.*ghosting, bias_field, .*inversion"):
        apply_artefact(scan, "ghost", seed=0)
    with pytest.raises(MedNCAError, match=r"unknown artefact 'smudge'; valid artefacts: ghosting"):
        parse_artefacts("noise,smudge")


def test_artefact_lists_parse_all_none_and_repeats():
    assert parse_artefacts("all") == ARTEFACTS
    assert parse_artefacts(" noise, none ,blur,noise") == ("noise", "blur")
    assert parse_artefacts(["spike", "all"]) == ("spike", *(a for a in ARTEFACTS if a != "spike"))
    assert parse_artefacts(()) == () and parse_artefacts("none") == ()


def test_scans_under_a_condition_depend_on_seed_case_and_artefact_only(scan):
    assert scan_under(scan, "case_1", "none", 0) is scan
    a = scan_under(scan, "case_1", "motion", 0).array
    np.testing.assert_array_equal(a, apply_artefact(scan, "motion", artefact_seed(0, "case_1", "motion")).array)
    assert not np.array_equal(a, scan_under(scan, "case_2", "motion", 0).array)
    assert not np.array_equal(a, scan_under(scan, "case_1", "motion", 1).array)
    assert len({artefact_seed(0, "case_1", n) for n in ARTEFACTS}) == len(ARTEFACTS)
