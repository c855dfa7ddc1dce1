"""Turning volume slices into model inputs, and model outputs back into slices.

A model records how its inputs were prepared (``Preprocessing``, saved in its checkpoint), so inference
prepares a new scan exactly as the training data was. The reference hippocampus model resizes each slice
to 64x64 (bicubic, aspect ratio not kept) and rescales each slice between its 0.5 and 99.5 percentiles.

A model may also read the slices on either side of the one it segments (``Preprocessing.context``): the
hippocampus is a 3D structure, and a cell on an unclear outline sees nothing of the slices above and below.
Each neighbour is prepared as the slice itself is and stacked as an input channel, in the model's slice order,
so "before" is the same side of the body whatever order the scan is stored in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

RESIZE_MODES = ("bicubic", "bilinear", "nearest", "area")
AXIS_PAIRS = ("LR", "AP", "SI")
SCOPES = ("slice", "volume")
MAX_CONTEXT = 8  # neighbours on each side: 17 input channels at most


@dataclass(frozen=True)
class Preprocessing:
    """How a slice becomes a model input.

    ``orientation`` is the NIfTI axis codes of the arrays the model was trained on ("RAS": i runs to the
    right, j anterior, k superior); every scan is brought to it before slicing, and ``axis`` is the axis of
    that orientation the model slices along (2 in RAS: axial slices). Model files written before the field
    existed were all trained on the MSD hippocampus data, which is stored RAS, hence the default.

    ``context`` is the number of neighbouring slices on each side the model reads with the slice (0: the
    slice alone, as the authors' model); the model then has ``input_channels`` = 1 + 2 x ``context``.
    """

    axis: int = 2
    resize: str = "bicubic"
    percentiles: tuple[float, float] = (0.5, 99.5)
    scope: str = "slice"
    orientation: str = "RAS"
    context: int = 0

    @property
    def input_channels(self) -> int:
        """Input channels a model prepared this way reads: the slice and ``context`` neighbours on each side."""
        return 1 + 2 * self.context

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
        if isinstance(self.context, bool) or not isinstance(self.context, int) or not 0 <= self.context <= MAX_CONTEXT:
            raise ValueError(f"context must be an integer from 0 to {MAX_CONTEXT}, got {self.context!r}")

    def to_dict(self) -> dict:
        """The fields a model file records; ``context`` only when the model reads neighbours, so the files of
        one-slice models stay as earlier versions wrote and read them."""
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        if not self.context:
            del d["context"]
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


def with_neighbours(inputs: torch.Tensor, context: int) -> torch.Tensor:
    """Prepared slices of one scan ``[S, 1, h, w]``, in the model's slice order -> ``[S, 1 + 2*context, h, w]``:
    channel ``context + d`` holds the slice ``d`` places on (``d`` from ``-context`` to ``context``, the slice
    itself in the centre). Beyond the scan's first and last slice the nearest slice stands in, as a scan's
    edge is usually empty background."""
    if context == 0:
        return inputs
    n = inputs.shape[0]
    index = (torch.arange(n)[:, None] + torch.arange(-context, context + 1)[None, :]).clamp_(0, n - 1)
    return inputs[:, 0][index]


def scan_inputs(array: np.ndarray, axis: int, size: tuple[int, int], prep: Preprocessing) -> torch.Tensor:
    """One scan (float array in the model's orientation) sliced along ``axis`` -> model inputs
    ``[S, prep.input_channels, *size]`` in slice order: each slice prepared, then stacked with its neighbours.
    With per-slice statistics the slices are prepared 64 at a time, so a large scan is never copied whole."""
    slices = np.moveaxis(array, axis, 0)
    step = len(slices) if prep.scope == "volume" else 64
    inputs = torch.cat([
        prepare_slices(torch.from_numpy(np.ascontiguousarray(slices[i : i + step], np.float32)), size, prep)
        for i in range(0, len(slices), step)
    ])
    return with_neighbours(inputs, prep.context)


def restore_slices(prob: torch.Tensor, native_size: tuple[int, int]) -> torch.Tensor:
    """Model-space probabilities ``[N, K, h, w]`` -> native slice size, bilinear.

    Resizing probabilities and thresholding afterwards keeps about 3 Dice points that a nearest-neighbour
    resize of the mask loses on the hippocampus data.
    """
    if tuple(prob.shape[-2:]) == tuple(native_size):
        return prob
    return F.interpolate(prob, size=native_size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
