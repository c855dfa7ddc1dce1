"""Training augmentation on model-space slices in [0, 1]: appearance changes any scanner makes (``augment``)
and, at chosen rates, changes of shape and pose (``deform``) and MRI artefacts (``add_artefacts``).

The artefacts are two-dimensional versions of those of ``mednca.artefacts`` (which corrupts whole scans to
test models): a model is trained on slices, so each is simulated in the slice's own k-space or plane. A
3D artefact along the slice axis (ghosts or thick slices across slices) has no 2D version; its in-plane
form is the nearest. Each chosen slice gets one artefact, all equally likely:

==========  ==========================================================================================
artefact    on one slice
==========  ==========================================================================================
spike       one k-space spike: stripes of a random frequency and direction, amplitude 0.25-1.0 of
            the slice's mean (what TorchIO's ``RandomSpike`` of intensity 0.25-1.0 gives)
ghosting    every 4th-6th k-space line along one axis scaled by 1 - (0.5 to 2.0), the centre kept
motion      k-space filled in 2-4 segments along one axis, each from the slice moved by up to 10
            degrees and 10 % of its width
thick       one axis sampled at 1/2 to 1/5 of its pixels and interpolated back (in-plane anisotropy)
blur        Gaussian blur, std 0.5-4 pixels (2 mm is about 3.5 model pixels in the MSD crops)
noise       Gaussian noise, std 5-20 % of the intensity range
inversion   inverted contrast, 1 - x (a T2-like scan given to a T1 model)
==========  ==========================================================================================

Thick slices *across* the slice axis (the robustness suite's anisotropy along it, which costs the models
most) need the neighbouring slices: ``thicken_across`` replaces a share of a batch's slices by what a scan
of 2-5 times the slice spacing shows at their position, a blend of the case's slices around them.

Slices may carry their neighbours as further channels (``preprocess.with_neighbours``). Every change here
treats them as the same scan would show them: one flip, bias field and deformation for the whole stack, one
artefact drawn once and put on each, and the thick-slice blend taken at each neighbour's own position. Each
channel is rescaled on its own, as preprocessing rescales each slice.

Nothing here draws from the generator unless it is used: a recipe without artefacts trains exactly as
before they existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .preprocess import rescale_percentiles

TRAINING_ARTEFACTS = ("spike", "ghosting", "motion", "thick", "blur", "noise", "inversion")


def augment(
    images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random appearance changes a scanner or a protocol could make, on model-space slices in [0, 1]:
    a left-right flip (slice dimension 0 is left-right in the MSD crops; front and back are never swapped,
    since they tell the anterior class from the posterior one), gamma, contrast and brightness, a smooth
    multiplicative bias field, noise. The result is rescaled per slice as preprocessing would."""
    n = images.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-2), images)
    labels = torch.where(flip.view(-1, 1, 1, 1), labels.flip(-2), labels)
    coarse = torch.randn((n, 1, 3, 3), generator=gen) * 0.25
    field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True).exp()
    gamma = torch.exp(torch.empty((n, 1, 1, 1)).uniform_(-0.4, 0.4, generator=gen))
    scale = torch.empty((n, 1, 1, 1)).uniform_(0.8, 1.2, generator=gen)
    shift = torch.empty((n, 1, 1, 1)).uniform_(-0.1, 0.1, generator=gen)
    noise = torch.randn(images.shape, generator=gen) * torch.empty((n, 1, 1, 1)).uniform_(0, 0.04, generator=gen)
    x = (images * field).clamp(min=0).pow(gamma) * scale + shift + noise
    return rescale_each(x), labels


def rescale_each(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` with every channel of every slice rescaled on its own, as ``prepare_slices`` rescales a
    slice (the neighbours of a slice were prepared as slices in their own right)."""
    return rescale_percentiles(x.reshape(-1, 1, *x.shape[-2:]), (0.5, 99.5), per_slice=True).view_as(x)


def deform(
    images: torch.Tensor, labels: torch.Tensor, rate: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each slice, with probability ``rate``, a random in-plane rotation (up to 15 degrees), a scale
    of 0.9-1.1 along each axis and a shift of up to 5 % of the width, the same for its labels: hippocampi
    differ in shape, pose and size, and the MSD crops around them in aspect ratio, more than flips show.
    Labels ``[N, K, H, W]`` are resampled linearly with the background as one more class and each pixel takes
    the largest, so they stay masks and two classes that meet leave no gap between them; both use
    reflection at the edges so image and labels stay aligned there too."""
    if rate <= 0:
        return images, labels
    n = images.shape[0]
    chosen = (torch.rand(n, generator=gen) < rate).nonzero().flatten()
    if chosen.numel() == 0:
        return images, labels
    m = chosen.numel()
    angle = torch.empty(m).uniform_(-math.pi / 12, math.pi / 12, generator=gen)
    scale = torch.exp(torch.empty((m, 2)).uniform_(math.log(0.9), math.log(1.1), generator=gen))
    shift = torch.empty((m, 2)).uniform_(-0.1, 0.1, generator=gen)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack((torch.stack((cos / scale[:, 0], -sin / scale[:, 0], shift[:, 0]), 1),
                         torch.stack((sin / scale[:, 1], cos / scale[:, 1], shift[:, 1]), 1)), 1)
    grid = F.affine_grid(theta, [m, 1, *images.shape[-2:]], align_corners=False)
    images, labels = images.clone(), labels.clone()
    images[chosen] = F.grid_sample(images[chosen], grid, padding_mode="reflection", align_corners=False)
    one_hot = labels[chosen].float()
    one_hot = torch.cat((1 - one_hot.sum(1, keepdim=True).clamp(max=1), one_hot), 1)  # background first
    moved = F.grid_sample(one_hot, grid, padding_mode="reflection", align_corners=False).argmax(1, keepdim=True)
    labels[chosen] = (moved == torch.arange(1, labels.shape[1] + 1).view(1, -1, 1, 1)).to(labels.dtype)
    return images, labels


def thicken_across(
    slices: torch.Tensor, case_index: torch.Tensor, idx: torch.Tensor, rate: float, gen: torch.Generator
) -> torch.Tensor:
    """The slices ``slices[idx]``, each chosen with probability ``rate`` replaced by its position in the same
    case scanned with 2-5 times the slice spacing and interpolated back, as TorchIO's ``RandomAnisotropy``
    does along one axis: every f-th slice is kept (at a random phase) and slice z becomes the linear
    interpolation of the two kept ones around it, at distance w*f below and (1-w)*f above (w uniform).
    ``slices`` ``[N, C, H, W]`` holds every slice of every case (with its neighbours when ``C`` > 1, the slice
    itself the centre channel), each case's slices together and in order, ``case_index`` the case of each;
    the neighbours of a chosen slice are what the same thick scan shows at their positions. Positions beyond a
    case's ends take its first or last slice, as ``with_neighbours`` does. The chosen slices are rescaled to
    [0, 1]; their labels stay those of ``idx``."""
    out = slices[idx]
    if rate <= 0:
        return out
    n = idx.shape[0]
    chosen = torch.rand(n, generator=gen) < rate
    factor = torch.empty(n).uniform_(2.0, 5.0, generator=gen)
    weight = torch.rand(n, generator=gen)
    rows = chosen.nonzero().flatten()
    if rows.numel() == 0:
        return out
    context = slices.shape[1] // 2
    scan = slices[:, context : context + 1]  # each slice once
    new_case = torch.ones(case_index.shape[0], dtype=torch.bool)
    new_case[1:] = case_index[1:] != case_index[:-1]
    starts = new_case.nonzero().flatten()
    ends = torch.cat((starts[1:], starts.new_tensor([case_index.shape[0]]))) - 1
    run = new_case.cumsum(0)[idx[rows]] - 1  # which case's run of slices each chosen one is in
    first, last = starts[run], ends[run]
    f = factor[rows]
    kept = idx[rows] - weight[rows] * f  # a kept slice of the thick scan: the one below the chosen slice
    blends = []
    for d in range(-context, context + 1):
        z = (idx[rows] + d).clamp(min=first, max=last)  # the neighbour, as with_neighbours picks it
        t = weight[rows] + (z - idx[rows]) / f  # where z lies between kept slices, in units of f
        below = kept + t.floor() * f  # the kept slice at or below z
        w = (t - t.floor()).view(-1, 1, 1, 1)
        blends.append((1 - w) * _at(scan, below, first, last) + w * _at(scan, below + f, first, last))
    out[rows] = rescale_each(torch.cat(blends, dim=1))
    return out


def _at(slices: torch.Tensor, position: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Slices at fractional ``position``s, linear between neighbours, clamped to ``[first, last]``."""
    position = torch.minimum(torch.maximum(position, first.to(position.dtype)), last.to(position.dtype))
    low = position.floor().long()
    high = torch.minimum(low + 1, last)
    t = (position - low).view(-1, 1, 1, 1).to(slices.dtype)
    return (1 - t) * slices[low] + t * slices[high]


def add_artefacts(images: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Give each slice of ``images`` ``[N, C, H, W]`` one random artefact with probability ``rate``, the same
    one (drawn once) on each of its channels, as a scan's artefact shows on neighbouring slices too; those
    slices are rescaled to [0, 1] as preprocessing would, the others are returned unchanged."""
    if rate <= 0:
        return images
    n = images.shape[0]
    chosen = torch.rand(n, generator=gen) < rate
    kinds = torch.randint(len(TRAINING_ARTEFACTS), (n,), generator=gen)
    out = images.clone()
    for i in chosen.nonzero().flatten().tolist():
        x = apply_artefact(images[i], TRAINING_ARTEFACTS[int(kinds[i])], gen)
        out[i] = rescale_each(x[None])[0]
    return out


def apply_artefact(x: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """One artefact (see the module's table) on one slice ``[H, W]`` or a stack of slices ``[C, H, W]``, its
    random settings drawn once for the stack (noise excepted: it differs from slice to slice); not rescaled."""
    return _ARTEFACTS[name](x, gen)


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _fft(x: torch.Tensor) -> torch.Tensor:
    """The centred 2D spectrum of each slice of ``[..., H, W]``."""
    return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))


def _ifft(spectrum: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)))


def _planes(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` as ``[N, 1, H, W]``, for the 2D operations of torch.nn.functional."""
    return x.reshape(-1, 1, *x.shape[-2:])


def _spike(x, gen):
    h, w = x.shape[-2:]
    while True:
        ky, kx = (int(torch.randint(-s // 2, s // 2 + 1, (), generator=gen)) for s in (h, w))
        if ky or kx:
            break
    yy, xx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    phase = 2 * math.pi * (ky * yy / h + kx * xx / w) + _uniform(0, 2 * math.pi, gen)
    return x + _uniform(0.25, 1.0, gen) * x.mean((-2, -1), keepdim=True) * torch.cos(phase)


def _ghosting(x, gen):
    axis = int(torch.randint(2, (), generator=gen))
    every = int(torch.randint(4, 7, (), generator=gen))
    size = x.shape[axis - 2]
    lines = torch.zeros(size, dtype=torch.bool)
    lines[::every] = True
    lines[size // 2] = False  # the centre of k-space
    factor = torch.where(lines, 1 - _uniform(0.5, 2.0, gen), 1.0)
    return _ifft(_fft(x) * (factor[:, None] if axis == 0 else factor[None, :])).real


def _motion(x, gen):
    h, w = x.shape[-2:]
    axis = int(torch.randint(2, (), generator=gen))
    segments = int(torch.randint(2, 5, (), generator=gen))
    cuts = sorted(torch.randperm(x.shape[axis - 2] - 1, generator=gen)[: segments - 1].add(1).tolist())
    bounds = [0, *cuts, x.shape[axis - 2]]
    moved = torch.empty(x.shape, dtype=torch.complex64 if x.dtype == torch.float32 else torch.complex128)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        angle = math.radians(_uniform(-10, 10, gen))
        shift = [_uniform(-0.2, 0.2, gen) for _ in range(2)]  # affine_grid units: 0.2 is 10% of the width
        theta = torch.tensor([[math.cos(angle), -math.sin(angle), shift[0]],
                              [math.sin(angle), math.cos(angle), shift[1]]], dtype=x.dtype)
        planes = _planes(x)
        grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False).expand(len(planes), -1, -1, -1)
        view = F.grid_sample(planes, grid, padding_mode="border", align_corners=False).view_as(x)
        index = (..., slice(start, stop), slice(None)) if axis == 0 else (..., slice(start, stop))
        moved[index] = _fft(view)[index]
    return _ifft(moved).abs()


def _thick(x, gen):
    axis = int(torch.randint(2, (), generator=gen))
    size = list(x.shape[-2:])
    coarse = max(2, round(size[axis] / _uniform(2.0, 5.0, gen)))
    down = [coarse if a == axis else s for a, s in enumerate(size)]
    low = F.interpolate(_planes(x), size=down, mode="area")
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).view_as(x)


def _blur(x, gen):
    std = _uniform(0.5, 4.0, gen)
    radius = math.ceil(3 * std)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / std) ** 2)
    kernel = kernel / kernel.sum()
    y = F.pad(_planes(x), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    return F.conv2d(y, kernel.view(1, 1, -1, 1)).view_as(x)


def _noise(x, gen):
    return x + torch.randn(x.shape, generator=gen, dtype=x.dtype) * _uniform(0.05, 0.2, gen)


def _inversion(x, gen):
    return 1.0 - x


_ARTEFACTS = {
    "spike": _spike, "ghosting": _ghosting, "motion": _motion, "thick": _thick, "blur": _blur,
    "noise": _noise, "inversion": _inversion,
}
