"""Turning volume slices into model inputs, and model outputs back into slices.

A model records how its inputs were prepared (``Preprocessing``, saved in its checkpoint), so inference
prepares a new scan exactly as the training data was. The reference hippocampus model resizes each slice
to 64x64 (bicubic, aspect ratio not kept) and rescales each slice between its 0.5 and 99.5 percentiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

RESIZE_MODES = ("bicubic", "bilinear", "nearest", "area")
AXIS_PAIRS = ("LR", "AP", "SI")
SCOPES = ("slice", "volume")


@dataclass(frozen=True)
class Preprocessing:
    """How a slice becomes a model input.

    ``orientation`` is the NIfTI axis codes of the arrays the model was trained on ("RAS": i runs to the
    right, j anterior, k superior); every scan is brought to it before slicing, and ``axis`` is the axis of
    that orientation the model slices along (2 in RAS: axial slices). Model files written before the field
    existed were all trained on the MSD hippocampus data, which is stored RAS, hence the default.
    """

    axis: int = 2
    resize: str = "bicubic"
    percentiles: tuple[float, float] = (0.5, 99.5)
    scope: str = "slice"
    orientation: str = "RAS"

    def __post_init__(self):
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if not is_axis_codes(self.orientation):
            raise ValueError(
                f"orientation must be three axis codes, one of each pair L/R, A/P, S/I (e.g. 'RAS'), "
                f"got {self.orientation!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing fields: {sorted(unknown)}")
        return cls(**d)


def is_axis_codes(codes) -> bool:
    """True for three NIfTI axis codes naming each of the L/R, A/P and S/I directions once ("RAS", "LPS")."""
    if not isinstance(codes, str) or len(codes) != 3:
        return False
    return sorted(next((i for i, pair in enumerate(AXIS_PAIRS) if c in pair), -1) for c in codes) == [0, 1, 2]


def resize_slices(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` slices to ``size`` (no antialiasing, as OpenCV's resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    align = False if mode in ("bicubic", "bilinear") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


def rescale_percentiles(x: torch.Tensor, percentiles: tuple[float, float], per_slice: bool) -> torch.Tensor:
    """Clip to the given percentiles and map them to [0, 1].

    The authors first min-max rescale and z-normalise; both are affine maps, which a percentile rescale
    undoes, so they are left out. A constant slice (or volume) becomes all zeros.
    """
    flat = x.reshape(x.shape[0], -1) if per_slice else x.reshape(1, -1)
    q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0], dtype=torch.float64)
    bounds = torch.quantile(flat.double(), q, dim=1)  # [2, N]
    lo = bounds[0].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    hi = bounds[1].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    span = hi - lo
    out = (x.clamp(min=lo, max=hi) - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out))


def prepare_slices(slices: torch.Tensor, size: tuple[int, int], prep: Preprocessing) -> torch.Tensor:
    """Native slices ``[N, H, W]`` (float) -> model inputs ``[N, 1, *size]`` in [0, 1]."""
    x = resize_slices(slices.unsqueeze(1), size, prep.resize)
    return rescale_percentiles(x, prep.percentiles, per_slice=prep.scope == "slice")


def restore_slices(prob: torch.Tensor, native_size: tuple[int, int]) -> torch.Tensor:
    """Model-space probabilities ``[N, K, h, w]`` -> native slice size, bilinear.

    Resizing probabilities and thresholding afterwards keeps about 3 Dice points that a nearest-neighbour
    resize of the mask loses on the hippocampus data.
    """
    if tuple(prob.shape[-2:]) == tuple(native_size):
        return prob
    return F.interpolate(prob, size=native_size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
