"""Scans re-stored in another index order, for the tests that check results do not depend on it."""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from mednca.orientation import axis_codes
from mednca.volume import Volume


def reoriented(volume: Volume, codes: str) -> Volume:
    """``volume`` stored in another index order: the same voxels in the same places of the patient."""
    transform = ornt_transform(axcodes2ornt(tuple(axis_codes(volume.affine))), axcodes2ornt(tuple(codes)))
    array = np.ascontiguousarray(apply_orientation(volume.array, transform))
    return Volume(array, volume.affine @ inv_ornt_aff(transform, volume.shape))
