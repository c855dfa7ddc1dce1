"""Bringing a scan to the orientation a model was trained in, and its results back, exactly.

A model's 3x3 kernels are learned on slices of one anatomical orientation: they are not invariant to flips
or transposes, and the axis it slices along is anatomy (axial, coronal, sagittal). The same head is stored
in other index orders by other tools, and every DICOM series comes in LPS order, so segmenting the raw
array would silently give nonsense. The engine therefore reorients each scan to the model's axis codes
(a permutation and flips of the array, found from the affine: no resampling, nothing lost), works there,
and applies the exact inverse to what it hands back. Slice indices the caller sees are always the scan's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation, ornt_transform

PLANES = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
PLANE_NAMES = ("axial", "coronal", "sagittal")


def axis_codes(affine: np.ndarray) -> str:
    """The NIfTI axis codes of an affine ("RAS", "LPS", ...): where each index axis points, nearest axis."""
    return "".join(aff2axcodes(affine))


def plane_of(codes: str, axis: int) -> str:
    """The anatomical plane of the slices taken along ``axis`` of arrays in orientation ``codes``."""
    return PLANES[codes[axis]]


def axis_of_plane(codes: str, plane: str) -> int:
    """The axis of arrays in orientation ``codes`` along which the slices lie in ``plane`` (axial, ...)."""
    if plane not in PLANE_NAMES:
        raise ValueError(f"plane must be axial, coronal or sagittal, got {plane!r}")
    return next(axis for axis, code in enumerate(codes) if PLANES[code] == plane)


@dataclass(frozen=True)
class Reorientation:
    """How arrays on a scan's grid map to a model's orientation and back.

    ``ornt`` is nibabel's orientation transform: row i says which model axis scan axis i becomes and
    whether it is reversed (-1). Arrays may carry leading axes (classes, runs); only the last three move.
    """

    scan: str  # the scan's axis codes
    model: str  # the model's axis codes
    ornt: np.ndarray

    @classmethod
    def between(cls, affine: np.ndarray, model_codes: str) -> Reorientation:
        ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(model_codes)))
        return cls(axis_codes(affine), model_codes, ornt.astype(int))

    @property
    def identity(self) -> bool:
        return bool((self.ornt[:, 0] == np.arange(3)).all() and (self.ornt[:, 1] == 1).all())

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """``array`` (scan layout in its last three axes) in the model's orientation (a view when possible)."""
        return self._apply(array, self.ornt)

    def to_scan(self, array: np.ndarray) -> np.ndarray:
        """The exact inverse of :meth:`to_model`."""
        inverse = np.empty_like(self.ornt)
        for scan_axis, (model_axis, flip) in enumerate(self.ornt):
            inverse[model_axis] = (scan_axis, flip)
        return self._apply(array, inverse)

    def model_axis(self, scan_axis: int) -> int:
        """The model-space axis that ``scan_axis`` becomes."""
        return int(self.ornt[scan_axis, 0])

    def scan_axis(self, model_axis: int) -> int:
        """The scan axis that becomes ``model_axis``."""
        return int(np.flatnonzero(self.ornt[:, 0] == model_axis)[0])

    def reversed(self, scan_axis: int) -> bool:
        """True when slice i along ``scan_axis`` is slice n-1-i in the model's orientation."""
        return bool(self.ornt[scan_axis, 1] < 0)

    @staticmethod
    def _apply(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        moved = np.moveaxis(array, range(lead), range(3, array.ndim)) if lead else array
        out = apply_orientation(moved, ornt)
        return np.moveaxis(out, range(3, array.ndim), range(lead)) if lead else out
