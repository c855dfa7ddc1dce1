"""MRI artefacts at fixed strengths, seeded, for testing how a model and its quality map hold up.

Each artefact is one TorchIO transform with fixed parameter ranges (or, for inversion, a plain formula).
The same (volume, name, seed) always gives the same result, so every model compared is shown exactly the
same corrupted scans. The strengths are severe but seen in clinical scans, chosen on the MSD Task04
hippocampus crops (1 mm voxels, about 35 x 50 x 35 mm) so that, across cases, the shipped model's Dice
ranges from unharmed to failed (single runs on three held-out cases, clean 0.88-0.90: ghosting 0.55-0.79,
motion 0.16-0.73, spike 0.79-0.83, noise 0.75-0.85, blur 0.81-0.83, anisotropy 0.84-0.87, bias field
unchanged; milder settings left every Dice within 0.01 of clean and could not test a quality verdict).
TorchIO draws from each range with the seeded generator (the axis too, where
there is a choice), so seeds differ in where and how, not in how strong.

==========  ==========================================================================================
artefact    what is simulated (TorchIO parameters)
==========  ==========================================================================================
ghosting    periodic motion (pulsation, breathing): 4-6 ghosts along one random axis, intensity 1.5-2.0
            of the k-space maximum (``RandomGhosting(num_ghosts=(4, 6), intensity=(1.5, 2.0))``)
bias_field  coil inhomogeneity: smooth multiplicative field, polynomial order 3, coefficients in
            +-0.6 (``RandomBiasField(coefficients=0.6)``)
motion      a patient moving during the scan: 3 movements of up to 10 degrees and 10 mm about each axis
            (``RandomMotion(degrees=10, translation=10, num_transforms=3)``)
spike       exactly one k-space spike (herringbone stripes), 0.5-1.0 of the spectrum's maximum
            (``RandomSpike(num_spikes=(1, 1), intensity=(0.5, 1.0))``)
noise       Gaussian noise of std 15% of the scan's 99.5th intensity percentile (an SNR of about 7)
            (``RandomNoise(std=(0.15, 0.15))`` on the scan scaled to that percentile)
blur        a lower-resolution acquisition: Gaussian blur of std 1.5-2.0 mm on each axis
            (``RandomBlur(std=(1.5, 2.0))``; FWHM 3.5-4.7 mm)
anisotropy  thick slices: one random axis sampled at 4-5 times its spacing and interpolated back
            (``RandomAnisotropy(downsampling=(4, 5))``), edges padded so no black border appears
inversion   inverted contrast (a T2-like scan given to a T1 model): max + min - x. Needs no seed: the same
            for every seed
==========  ==========================================================================================

The transforms run on the scan divided by its 99.5th percentile of absolute intensity and are scaled back,
so the noise level is relative to the scan's own brightness (the others do not depend on scale). The result
is float32 on the input's grid (same shape and affine). TorchIO is imported on first use, so importing the
engine stays fast.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

from .errors import MedNCAError
from .volume import Volume, image_array

CLEAN = "none"
ARTEFACTS = ("ghosting", "bias_field", "motion", "spike", "noise", "blur", "anisotropy", "inversion")
ANISOTROPY_MAX = 5.0  # largest downsampling of "anisotropy": how far the edges are padded
SCALE_PERCENTILE = 99.5


def _transform(name: str):
    """The TorchIO transform of an artefact (see the table in the module docstring)."""
    import torchio as tio  # here, not at the top: importing torchio costs most of a second

    return {
        "ghosting": lambda: tio.RandomGhosting(num_ghosts=(4, 6), axes=(0, 1, 2), intensity=(1.5, 2.0)),
        "bias_field": lambda: tio.RandomBiasField(coefficients=0.6, order=3),
        "motion": lambda: tio.RandomMotion(degrees=10, translation=10, num_transforms=3),
        "spike": lambda: tio.RandomSpike(num_spikes=(1, 1), intensity=(0.5, 1.0)),  # num_spikes=1: 0 or 1
        "noise": lambda: tio.RandomNoise(mean=0, std=(0.15, 0.15)),
        "blur": lambda: tio.RandomBlur(std=(1.5, 2.0)),
        "anisotropy": lambda: tio.RandomAnisotropy(axes=(0, 1, 2), downsampling=(4.0, ANISOTROPY_MAX)),
    }[name]()


def check_artefact(name: str) -> str:
    """``name`` if it is a known artefact, else a MedNCAError listing the valid ones."""
    if name not in ARTEFACTS:
        raise MedNCAError(f"unknown artefact {name!r}; valid artefacts: {', '.join(ARTEFACTS)}")
    return name


def parse_artefacts(names: str | Iterable[str]) -> tuple[str, ...]:
    """Artefact names from a comma-separated string or a sequence, in the given order without repeats.
    ``all`` stands for every artefact; ``none`` (the clean scan, which is always scored) is dropped."""
    items = names.split(",") if isinstance(names, str) else list(names)
    chosen: list[str] = []
    for item in (str(i).strip() for i in items):
        if item in ("", CLEAN):
            continue
        for name in ARTEFACTS if item == "all" else (check_artefact(item),):
            if name not in chosen:
                chosen.append(name)
    return tuple(chosen)


def artefact_seed(seed: int, case: str, name: str) -> int:
    """The seed of artefact ``name`` on ``case``: depends on nothing else (not on the model), so every model
    evaluated with the same ``seed`` sees identical corrupted scans, and each case and artefact its own draw."""
    tags = [int(seed), zlib.crc32(case.encode()), zlib.crc32(name.encode())]
    return int(np.random.SeedSequence(tags).generate_state(1, np.uint32)[0])


def scan_under(volume: Volume, case: str, condition: str, seed: int) -> Volume:
    """Case ``case``'s scan as scored under ``condition``: the scan itself for "none", else the artefact
    seeded by ``artefact_seed(seed, case, condition)``. Evaluations and benchmarks get their inputs here, so
    they score the same scans."""
    if condition == CLEAN:
        return volume
    return apply_artefact(volume, condition, artefact_seed(seed, case, condition))


def apply_artefact(volume: Volume, name: str, seed: int) -> Volume:
    """``volume`` with artefact ``name`` (see the module docstring), float32 on the same grid. The same
    seed gives the same result; torch's global random state is left as it was."""
    check_artefact(name)
    array = image_array(volume)
    if name == "inversion":
        return volume.like((array.max() + array.min() - array).astype(np.float32))
    abs_array = np.abs(array)
    scale = float(np.percentile(abs_array, SCALE_PERCENTILE)) or float(abs_array.max())
    result = _torchio(array / scale, volume.affine, name, seed) * scale
    return volume.like(result.astype(np.float32))


def _torchio(array: np.ndarray, affine: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Run the artefact's transform on ``array`` with torch's generator seeded, inside a forked RNG."""
    import torch
    import torchio as tio

    pad = int(np.ceil(ANISOTROPY_MAX)) if name == "anisotropy" else 0
    if pad:
        # resampling back to the grid leaves the last planes outside the coarse one, filled with 0: pad the
        # scan with its own edge values first, so the border shows the scan instead of a black line
        array = np.pad(array, pad, mode="edge")
        affine = affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    image = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(array, np.float32))[None], affine=affine)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = _transform(name)(image).data[0].numpy()
    return out[pad:-pad, pad:-pad, pad:-pad] if pad else out
