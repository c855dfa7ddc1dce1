"""Segmenting volumes: slicing, batched stochastic runs, quality maps and recorded growth.

Every entry point is a generator that yields ``Progress`` and returns its result (see ``progress.py``), and
has a plain function beside it that runs it to the end. Slices are processed in chunks of ``CHUNK`` model
inputs, which keeps the per-step tensors inside the CPU caches and the memory bounded for any volume size.

Each (seed, run, slice) has its own random generator: a slice's result does not depend on the chunk size,
the thread count or which other slices are processed, so the recorded growth of one slice ends exactly at
the segmentation of the whole volume, and the first run of a quality map is the plain segmentation.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .model import MedNCA
from .orientation import Reorientation
from .preprocess import restore_slices, scan_inputs
from .progress import Progress, run_to_end
from .quality import (
    QualityCriteria,
    Verdict,
    VolumeEstimate,
    class_counts,
    criteria_of,
    judge,
    scattered_share,
    slice_scores,
    slices_to_check,
    volume_estimates,
    voxel_ml,
)
from .volume import Volume, image_array

# model inputs per batch: the convolution step is fastest at 8-16 (39 took 27% longer at 1 thread), the
# folded step (see step_paths) is indifferent (8 to 39 within 2%)
CHUNK = 16


@dataclass
class Segmentation:
    """Labels (0 background, k for class k) and per-class probabilities in the scan's own geometry."""

    labels: Volume
    probabilities: np.ndarray  # float32 [K, *volume.shape]
    class_names: tuple[str, ...]
    axis: int

    @property
    def volumes(self) -> list[VolumeEstimate]:
        """Volume of each class (and the whole structure) in mL."""
        counts = class_counts(self.labels.array, len(self.class_names))
        return volume_estimates(counts, self.class_names, voxel_ml(self.labels.affine))


@dataclass
class QualityReport:
    """Agreement of ``runs`` stochastic runs, and what it means for the user (see ``quality.py``).

    ``std`` marks where the model is unsure; NQM (sum of std over sum of mean probability, M3D-NCA) is
    computed in the model's slice space, as the authors do, and so are the per-slice sums. Every per-slice
    array runs along ``axis`` in the scan's own slice order.
    """

    mean: np.ndarray  # float32 [K, *volume.shape]
    std: np.ndarray  # float32 [K, *volume.shape]
    labels: Volume  # from the mean probability
    nqm: float
    slice_nqm: np.ndarray  # [n_slices]: std over mean probability per slice (explodes where little is predicted)
    slice_std: np.ndarray  # [n_slices]: sum of std per slice, the slice's uncertain mass
    slice_mass: np.ndarray  # [n_slices]: sum of the mean probability per slice
    slice_scores: np.ndarray  # [n_slices]: uncertain mass relative to the structure's typical slice
    flagged_slices: list[int]  # slices worth checking, least trustworthy first
    run_counts: np.ndarray  # int [runs, K]: voxels of each class in every single run
    volumes: list[VolumeEstimate]  # per class (and whole) in mL, with the spread across runs
    scattered: float  # share of labelled voxels outside the largest connected piece
    verdict: Verdict
    criteria: QualityCriteria
    axis: int
    runs: int
    class_names: tuple[str, ...]


@dataclass
class GrowthFrame:
    """The output after one step of one level, in native slice geometry."""

    level: int
    step: int
    probability: np.ndarray  # float32 [K, *shape of the selected slices in volume layout]
    hidden: np.ndarray | None  # float32 [channels - inputs - K, n_slices, h, w] at the level's size


@contextmanager
def torch_threads(n: int | None):
    """Use ``n`` intra-op threads inside the block and restore the caller's setting after it."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def slice_generators(seed: int, run: int, slices: Sequence[int]) -> list[torch.Generator]:
    """One generator per slice, seeded from (seed, run, slice index)."""
    gens = []
    for s in slices:
        state = np.random.SeedSequence([int(seed), int(run), int(s)]).generate_state(2, np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


@dataclass(frozen=True)
class SliceGeometry:
    """Where the model's slices lie in the scan: the reorientation, the slice axis on both sides, the scan's
    shape and the native size of a slice in the model's orientation."""

    reorientation: Reorientation
    scan_axis: int
    model_axis: int
    shape: tuple[int, int, int]
    native: tuple[int, int]

    def model_index(self, scan_index: int, n: int) -> int:
        """Slice ``scan_index`` of the scan (``n`` slices) in the model's order; the mapping is its own inverse."""
        return n - 1 - scan_index if self.reorientation.reversed(self.scan_axis) else scan_index

    def slices_of(self, scan_array: np.ndarray) -> np.ndarray:
        """A writable view ``[K, S, H, W]`` of a ``[K, *scan layout]`` array, in the model's slice order:
        results are written straight into their final place, with no full-size temporary."""
        return np.moveaxis(self.reorientation.to_model(scan_array), self.model_axis + 1, 1)


def slice_axis(model: MedNCA, volume: Volume) -> int:
    """The axis of ``volume``'s array along which ``model`` slices it (its trained plane, e.g. axial)."""
    reorientation = Reorientation.between(volume.affine, model.preprocessing.orientation)
    return reorientation.scan_axis(model.preprocessing.axis)


def _model_inputs(model: MedNCA, volume: Volume, axis: int | None) -> tuple[torch.Tensor, SliceGeometry]:
    """All slices of the scan, brought to the model's orientation and prepared as its metadata says (each with
    its neighbours along the slicing axis, for a model that reads them): ``[S, input_channels, h, w]`` in the
    model's slice order, and the geometry to map results back. ``axis`` is a scan axis; None means the model's
    own plane."""
    if axis is not None and axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    cfg, prep = model.config, model.preprocessing
    reorientation = Reorientation.between(volume.affine, prep.orientation)
    scan_axis = reorientation.scan_axis(prep.axis) if axis is None else axis
    model_axis = reorientation.model_axis(scan_axis)
    array = reorientation.to_model(image_array(volume))
    inputs = scan_inputs(array, model_axis, cfg.input_size, prep)
    native = tuple(int(d) for d in np.delete(array.shape, model_axis))
    return inputs, SliceGeometry(reorientation, scan_axis, model_axis, volume.shape, native)


def _outputs(model: MedNCA, state: torch.Tensor) -> torch.Tensor:
    k = model.config.input_channels
    return torch.sigmoid(state[:, k : k + model.config.output_channels])


def _run_chunks(model, inputs, items, seed, steps, fire_rate, stage) -> Generator[Progress, None, torch.Tensor]:
    """Model-space probabilities for ``items`` = [(run, slice), ...], in chunks, with progress."""
    out = torch.empty((len(items), model.config.output_channels, *model.config.input_size))
    for start in range(0, len(items), CHUNK):
        part = items[start : start + CHUNK]
        gens = [slice_generators(seed, r, [s])[0] for r, s in part]
        with torch.no_grad():
            logits = model(inputs[[s for _, s in part]], gens, steps, fire_rate)
        out[start : start + len(part)] = torch.sigmoid(logits)
        yield Progress(start + len(part), len(items), stage)
    return out


def _to_native(
    prob: torch.Tensor, geometry: SliceGeometry, labels: np.ndarray | None = None
) -> np.ndarray:
    """Model-space ``[S, K, h, w]`` -> ``[K, *scan layout]`` float32, restored ``CHUNK`` slices at a time
    into the final array; with ``labels`` (uint8, scan layout), their labels are written there as well.
    ``S`` may be fewer slices than the scan has (recorded growth): the scan axis then holds ``S``."""
    shape = list(geometry.shape)
    shape[geometry.scan_axis] = prob.shape[0]
    out = np.empty((prob.shape[1], *shape), np.float32)
    target = geometry.slices_of(out)
    label_target = None if labels is None else geometry.slices_of(labels[None])[0]
    for i in range(0, prob.shape[0], CHUNK):
        part = restore_slices(prob[i : i + CHUNK], geometry.native).permute(1, 0, 2, 3).numpy()  # [K, n, H, W]
        target[:, i : i + part.shape[1]] = part
        if label_target is not None:
            label_target[i : i + part.shape[1]] = labels_from_probabilities(part)
    return out


def labels_from_probabilities(prob: np.ndarray, cut: float = 0.5) -> np.ndarray:
    """``[K, ...]`` probabilities -> uint8 labels: one class, p > ``cut``; several, the most probable class where
    the class probabilities add up to more than ``cut``. The classes are parts of one structure that exclude each
    other, so their sum is the structure's probability: a voxel 0.45 anterior and 0.45 posterior, on the
    border between the parts, is hippocampus, not background (``benchmarks/labelling_rules.py``). The engine
    always cuts at 0.5; ``benchmarks/label_threshold.py`` sweeps the cut and finds no better one."""
    if prob.shape[0] == 1:
        return (prob[0] > cut).astype(np.uint8)
    best = prob.argmax(0)
    return np.where(prob.sum(0) > cut, best + 1, 0).astype(np.uint8)


def segment_iter(
    model: MedNCA,
    volume: Volume,
    *,
    axis: int | None = None,
    seed: int = 0,
    steps: tuple[int, ...] | None = None,
    fire_rate: float | None = None,
    threads: int | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Segment ``volume``; yields progress, returns the ``Segmentation``. ``axis`` (a scan axis) overrides
    the model's own slice plane."""
    with torch_threads(threads):
        inputs, geometry = _model_inputs(model, volume, axis)
    items = [(0, s) for s in range(inputs.shape[0])]
    prob = yield from _threaded(_run_chunks(model, inputs, items, seed, steps, fire_rate, "segment"), threads)
    labels = np.empty(volume.shape, np.uint8)
    with torch_threads(threads):
        native_prob = _to_native(prob, geometry, labels)
    return Segmentation(
        labels=volume.like(labels),
        probabilities=native_prob,
        class_names=model.config.class_names,
        axis=geometry.scan_axis,
    )


def quality_iter(
    model: MedNCA,
    volume: Volume,
    runs: int = 10,
    *,
    axis: int | None = None,
    seed: int = 0,
    steps: tuple[int, ...] | None = None,
    fire_rate: float | None = None,
    threads: int | None = None,
    criteria: QualityCriteria | None = None,
) -> Generator[Progress, None, QualityReport]:
    """``runs`` stochastic runs of every slice, batched together; yields progress, returns the report,
    judged with ``criteria`` (default: the model's own calibrated limits)."""
    if runs < 2:
        raise ValueError(f"a quality map needs at least 2 runs, got {runs}")
    with torch_threads(threads):
        inputs, geometry = _model_inputs(model, volume, axis)
    n = inputs.shape[0]
    items = [(r, s) for r in range(runs) for s in range(n)]
    prob = yield from _threaded(_run_chunks(model, inputs, items, seed, steps, fire_rate, "quality"), threads)
    prob = prob.view(runs, n, *prob.shape[1:])
    mean, std = prob.mean(0), prob.std(0, unbiased=False)
    scan_order = [geometry.model_index(i, n) for i in range(n)]
    slice_mass = mean.sum((1, 2, 3)).double().numpy()[scan_order]
    slice_std = std.sum((1, 2, 3)).double().numpy()[scan_order]
    # a slice with (almost) nothing predicted and nothing uncertain scores 0, not 0/0
    slice_nqm = np.where(slice_mass > 1.0, slice_std / np.maximum(slice_mass, 1.0), slice_std)
    total = float(mean.sum())
    nqm = float(std.sum()) / total if total > 0 else 0.0
    labels = np.empty(volume.shape, np.uint8)
    with torch_threads(threads):
        native_mean = _to_native(mean, geometry, labels)
        native_std = _to_native(std, geometry)
        run_counts = np.stack([_native_counts(prob[r], geometry) for r in range(runs)])
    criteria = criteria_of(model.provenance) if criteria is None else criteria
    k = model.config.output_channels
    volumes = volume_estimates(class_counts(labels, k), model.config.class_names, voxel_ml(volume.affine),
                               run_counts)
    scattered = scattered_share(labels)
    whole_runs = run_counts.sum(1).astype(np.float64)
    scores = slice_scores(slice_std, slice_mass)
    return QualityReport(
        mean=native_mean,
        std=native_std,
        labels=volume.like(labels),
        nqm=nqm,
        slice_nqm=slice_nqm,
        slice_std=slice_std,
        slice_mass=slice_mass,
        slice_scores=scores,
        flagged_slices=slices_to_check(scores, criteria),
        run_counts=run_counts,
        volumes=volumes,
        scattered=scattered,
        verdict=judge(nqm, whole_runs, scattered, int((labels > 0).sum()), criteria),
        criteria=criteria,
        axis=geometry.scan_axis,
        runs=runs,
        class_names=model.config.class_names,
    )


def _native_counts(prob: torch.Tensor, geometry: SliceGeometry) -> np.ndarray:
    """Voxels of each class in the labels of one run's model-space ``[S, K, h, w]`` probabilities at the
    scan's resolution, counted chunk by chunk (no full-size array)."""
    k = prob.shape[1]
    counts = np.zeros(k, np.int64)
    for i in range(0, prob.shape[0], CHUNK):
        part = restore_slices(prob[i : i + CHUNK], geometry.native).permute(1, 0, 2, 3).numpy()
        counts += class_counts(labels_from_probabilities(part), k)
    return counts


def record_growth(
    model: MedNCA,
    volume: Volume,
    *,
    slices: Sequence[int] | None = None,
    axis: int | None = None,
    seed: int = 0,
    steps: tuple[int, ...] | None = None,
    fire_rate: float | None = None,
    hidden: bool = False,
) -> Iterator[GrowthFrame]:
    """Yield the output after every step of every level for the chosen slices (default: all).

    ``slices`` are indices along the scan axis the model slices (``axis``, default its own plane); each
    frame holds them in that order. Only the current frame is held: a caller that wants the whole
    animation keeps the frames it needs. The last frame equals ``segment(...)``'s probabilities on those
    slices for the same seed. Hidden channels stay in the model's orientation and size.
    """
    inputs, geometry = _model_inputs(model, volume, axis)
    n = inputs.shape[0]
    chosen = list(range(n)) if slices is None else [int(s) for s in slices]
    if any(not 0 <= s < n for s in chosen):
        raise ValueError(f"slices must lie in 0..{n - 1} along axis {geometry.scan_axis}, got {chosen}")
    in_model = [geometry.model_index(s, n) for s in chosen]
    # a model whose slice axis runs the other way would hand the chosen slices back reversed
    reverse = geometry.reorientation.reversed(geometry.scan_axis)
    k, kout = model.config.input_channels, model.config.output_channels
    gens = slice_generators(seed, 0, in_model)
    states = model.iter_states(inputs[in_model], gens, steps, fire_rate)
    while True:
        with torch.no_grad():
            item = next(states, None)
            if item is None:
                return
            level, step, state = item
            prob = _to_native(_outputs(model, state), geometry)
            prob = np.ascontiguousarray(np.flip(prob, geometry.scan_axis + 1)) if reverse else prob
            extra = state[:, k + kout :].permute(1, 0, 2, 3).clone().numpy() if hidden else None
        yield GrowthFrame(level, step, prob, extra)


def _threaded(gen: Generator, threads: int | None):
    """Run a generator with the thread setting applied only while it computes, not while it is paused."""
    result = None
    while True:
        with torch_threads(threads):
            try:
                item = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
        yield item
    return result


def segment(model: MedNCA, volume: Volume, **kwargs) -> Segmentation:
    """Segment ``volume`` (see ``segment_iter`` for the options)."""
    return run_to_end(segment_iter(model, volume, **kwargs))


def quality_map(model: MedNCA, volume: Volume, runs: int = 10, **kwargs) -> QualityReport:
    """Quality map of ``runs`` stochastic runs (see ``quality_iter`` for the options)."""
    return run_to_end(quality_iter(model, volume, runs, **kwargs))
