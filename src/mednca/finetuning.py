"""Fine-tuning a model on a few annotated slices of one scan, and judging whether the result is better.

A clinician who paints 3-5 slices wants a model that is better on the slices nobody painted, and to be told
honestly whether it is: the adapted model is trained gently (``FinetuneSettings``), its Dice on the unpainted
slices is estimated by cross-validation over the painted ones, and it is recommended when that estimate
beats the base model's, or when the base model did poorly on the very slices the user painted. The loop
is a generator, like ``training.train_iter``: the caller sees progress and cancels by no longer iterating;
the model handed in is never modified.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .augmentation import augment
from .checkpoint import weights_digest
from .data import case_slices
from .errors import MedNCAError
from .inference import slice_axis
from .model import MedNCA
from .orientation import Reorientation, plane_of
from .progress import run_to_end
from .training import (
    MEASURED_DICE,
    TrainEvent,
    crop_forward,
    crop_origins,
    crop_windows,
    native_dice,
    native_masks,
    segmentation_loss,
)
from .volume import Volume, check_labels, image_array


@dataclass(frozen=True)
class FinetuneSettings:
    """How a model is adapted to one scan from a few annotated slices, and how it is judged. ``FINETUNE``
    holds the defaults that the engine, the command line and the plugin share.

    A few slices are learned by heart within tens of steps, and a jump of the weights shows on the slices
    nobody annotated. So training is gentle: ``iterations`` Adam steps at ``lr``, each on ``batch_size``
    augmented ``crop``-sized windows of the annotated slices at the fine level (None: whole slices), and
    the model kept is the running average of the weights (``average`` is the share of the past at each
    step), which moves smoothly where the raw weights jump from batch to batch.

    The judgement: on a slice it did not train on, the adapted model's Dice falls with the distance to the
    nearest annotated slice. Two points are measured: on the annotated slices themselves (distance 0), and,
    by cross-validation, as far away as the annotated slices are from each other (the annotated slices are
    dealt into at most ``folds`` groups, each segmented by a model trained the same way without it). The
    Dice expected on the slices that were not annotated is the cross-validated one plus a share of the
    adapted model's lead on its annotated slices: ``carry`` times their proximity (1 next to an annotated
    slice, 0 at the cross-validation's distance or farther, averaged over them). ``carry`` < 1 because even
    next to an annotated slice the lead is smaller than on it; 0.5 fitted 47 development runs with no mean
    error (1, a straight line, overestimated by 0.046; 0, cross-validation alone, underestimated by 0.043).
    Every Dice is pooled over ``runs`` stochastic runs. The adapted model is recommended when that estimate
    beats the base model's Dice on the annotated slices by ``margin`` or more and the cross-validation lost
    at most ``far_loss`` against the base model on the same slices (when it loses there, the gain next to
    annotated slices was as likely a loss as a gain in development). It is also recommended, whatever the
    estimate, when the base model's Dice on the annotated slices is below ``poor_base`` and the adapted
    model's is higher: the cross-validation is pessimistic where an artefact changes from slice to slice
    (motion, ghosting), and in development (72 runs with the stage-6 default as base) every fine-tune from
    a base that poor improved the unpainted slices, by +0.02 to +0.71, even when the estimate said it would
    lose. The three limits were chosen on those runs (``benchmarks/results/finetune.txt``).
    """

    iterations: int = 40
    lr: float = 3e-4
    batch_size: int = 8
    crop: int | None = 32
    average: float = 0.9
    folds: int = 4
    runs: int = 3
    carry: float = 0.5
    margin: float = 0.005
    far_loss: float = 0.005
    poor_base: float = 0.80

    def __post_init__(self):
        if min(self.iterations, self.batch_size, self.runs) < 1 or self.folds < 2:
            raise MedNCAError("fine-tuning needs at least 1 iteration, a batch of 1 window, 1 run and 2 folds")
        if self.crop is not None and self.crop < 1:
            raise MedNCAError(f"the fine-tuning window must be at least 1 pixel, not {self.crop}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise MedNCAError(f"the learning rate must be a positive number, not {self.lr}")
        if not 0 <= self.average < 1:
            raise MedNCAError(f"the weight average's share of the past must be in [0, 1), not {self.average}")
        if not 0 <= self.carry <= 1:
            raise MedNCAError(f"the share of the lead that carries over must be in [0, 1], not {self.carry}")


FINETUNE = FinetuneSettings()
FOREGROUND_CROPS = 0.8  # share of fine-tuning windows that hold annotated structure


@dataclass
class FinetuneReport:
    """What fine-tuning did, and what to expect from the adapted model.

    ``estimate_before`` and ``estimate_after`` are the whole-structure Dice expected on the slices that were
    NOT annotated: for the base model, its Dice on the annotated slices (which it never trained on); for the
    adapted one, the estimate ``FinetuneSettings`` describes (None with a single annotated slice).
    ``held_out_dice`` is the cross-validation's part of it: the Dice on annotated slices of models trained
    without them. ``learned_dice`` is the adapted model's on the annotated slices, pooled over the same runs
    as ``estimate_before``, so the two compare on one basis. ``recommended`` is True when the adapted model
    is expected to be better, and ``advice`` says in one line what to do. ``dice_before`` and ``dice_after``
    (per class, plus "whole", one run) are measured on the annotated slices themselves, which the adapted
    model trained on: they show that it learned them, not that it is better elsewhere. ``slices`` are
    indices along the scan axis the model slices; ``losses`` the training loss at each iteration of the
    adapted model.
    """

    slices: list[int]
    iterations: int
    losses: list[float]
    seconds: float
    dice_before: dict[str, float]
    dice_after: dict[str, float]
    estimate_before: float
    estimate_after: float | None
    held_out_dice: float | None
    learned_dice: float
    recommended: bool
    advice: str


def annotated_slices(labels: np.ndarray, axis: int) -> list[int]:
    """Indices along ``axis`` of the slices that carry any label."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    return np.flatnonzero(np.asarray(labels).any(axis=other)).tolist()


def finetune_iter(
    model: MedNCA,
    volume: Volume,
    labels,
    slices: Sequence[int] | None = None,
    *,
    iterations: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    settings: FinetuneSettings = FINETUNE,
    base_name: str | None = None,
) -> Generator[TrainEvent, None, tuple[MedNCA, FinetuneReport]]:
    """Adapt ``model`` to one scan from a few annotated slices; yields ``TrainEvent``s and returns
    ``(adapted model, FinetuneReport)``. ``model`` itself is never changed.

    ``labels`` (array or Volume, the shape of ``volume``) are used on the slices along the model's plane
    (the scan axis ``slice_axis`` names) that carry any label, or on ``slices`` (indices along that axis)
    when given (then an empty slice teaches "nothing here"). The scan is brought to the model's orientation
    first, as inference does. ``settings`` (default ``FINETUNE``) says how; ``iterations``, ``lr`` and
    ``batch_size`` override it. The adapted model is trained first (events of kind "step", counting its
    iterations), then the cross-validation models (kind "fold", counting all their iterations together,
    without a loss). ``base_name`` (the base model's name or file) goes into the adapted model's provenance.
    """
    overrides = {"iterations": iterations, "lr": lr, "batch_size": batch_size}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    chosen, axis, n, image, target, rows = _annotated(model, volume, labels, slices)
    inputs, onehot = case_slices(image, target, model.config, model.preprocessing)  # each with its neighbours
    inputs, onehot = inputs[rows], onehot[rows].float()

    t0 = time.perf_counter()
    before = native_dice(model, image, target, seed, rows)
    tuned, losses = yield from _tune(model, inputs, onehot, settings, [seed], "step", t0)
    after = native_dice(tuned, image, target, seed, rows)
    held_out = yield from _cross_validate(model, image, target, rows, inputs, onehot, settings, seed, t0)
    estimate_before = _dice(_overlap(model, image, target, rows, seed, settings.runs))
    learned = _dice(_overlap(tuned, image, target, rows, seed, settings.runs))
    estimate = None
    if held_out is not None:
        estimate = held_out + settings.carry * _proximity(chosen, n) * (learned - held_out)
    recommended, advice = advise(estimate_before, estimate, held_out, learned, settings)
    tuned.provenance = {  # the base's held-out Dice was measured on other weights: not carried over
        **{k: v for k, v in model.provenance.items() if k not in MEASURED_DICE},
        "finetuned_from": {k: model.provenance.get(k) for k in ("source", "iterations", "finetuned_from")},
        "finetune": {
            "base_model": base_name, "base_weights_sha256": _weights_digest(model),
            "slices": chosen, "axis": axis, "source": str(volume.source) if volume.source else None,
            "settings": asdict(settings), "seed": seed,
            "estimate_before": round(estimate_before, 4),
            "estimate_after": None if estimate is None else round(estimate, 4),
            "held_out_dice": None if held_out is None else round(held_out, 4),
            "learned_dice": round(learned, 4), "recommended": recommended,
        },
    }
    report = FinetuneReport(chosen, settings.iterations, losses, time.perf_counter() - t0, before, after,
                            estimate_before, estimate, held_out, learned, recommended, advice)
    yield TrainEvent(settings.iterations, settings.iterations, None, report.seconds, "done")
    return tuned, report


def finetune(model: MedNCA, volume: Volume, labels, slices: Sequence[int] | None = None, **kwargs):
    """``finetune_iter`` run to the end; returns ``(adapted model, FinetuneReport)``."""
    return run_to_end(finetune_iter(model, volume, labels, slices, **kwargs))


def _annotated(
    model: MedNCA, volume: Volume, labels, slices
) -> tuple[list[int], int, int, np.ndarray, np.ndarray, list[int]]:
    """The slices to learn from (scan indices along the model's plane), that axis, its number of slices, the
    whole image and labels in the model's orientation (a slice is prepared with its neighbours and its scan's
    statistics), and the slices to learn from as indices along the model's axis, in its order; refuses labels
    that do not fit."""
    lab = check_labels(labels, volume)
    k = model.config.output_channels
    top = int(lab.max(initial=0))
    if k > 1 and top > k:
        raise MedNCAError(
            f"the labels hold class {top}, but the model segments only {k} classes {model.config.class_names}"
        )
    axis = slice_axis(model, volume)
    reorientation = Reorientation.between(volume.affine, model.preprocessing.orientation)
    plane = plane_of(model.preprocessing.orientation, model.preprocessing.axis)
    chosen = sorted(set(int(s) for s in slices)) if slices is not None else annotated_slices(lab, axis)
    if not chosen:
        raise MedNCAError(f"no annotated slice along axis {axis} ({plane} slices, the plane the model segments): "
                          "label at least one slice to fine-tune on")
    n = lab.shape[axis]
    bad = [s for s in chosen if not 0 <= s < n]
    if bad:
        raise MedNCAError(f"slices {bad} lie outside the volume (axis {axis} has {n} slices)")
    in_model = sorted(n - 1 - s if reorientation.reversed(axis) else s for s in chosen)  # model's slice order
    return chosen, axis, n, reorientation.to_model(image_array(volume)), reorientation.to_model(lab), in_model


def _tune(
    model: MedNCA, inputs: torch.Tensor, onehot: torch.Tensor, settings: FinetuneSettings, seed: list[int],
    kind: str, t0: float, done: int = 0, total: int | None = None,
) -> Generator[TrainEvent, None, tuple[MedNCA, list[float]]]:
    """Train a copy of ``model`` on model-space slices as ``settings`` say; returns the running average of
    its weights and the loss per iteration. Events of kind "step" carry the loss and count this run's
    iterations; others count ``done`` + this run's iterations of ``total``, without a loss."""
    tuned = copy.deepcopy(model).train()
    average = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(tuned.parameters(), lr=settings.lr)
    state = np.random.SeedSequence(seed).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    n, losses = len(inputs), []
    crop = settings.crop if settings.crop is not None and settings.crop < min(model.config.input_size) else None
    for it in range(settings.iterations):
        idx = (torch.randperm(n, generator=gen)[: settings.batch_size] if settings.batch_size <= n
               else torch.randint(n, (settings.batch_size,), generator=gen))
        x, y = augment(inputs[idx], onehot[idx], gen)
        if crop is None:
            logits, _ = crop_forward(tuned, x, None, 0, gen)
        else:
            origins = crop_origins(y, crop, FOREGROUND_CROPS, gen)
            logits, _ = crop_forward(tuned, x, origins, crop, gen)
            y = crop_windows(y, origins, crop)
        loss = segmentation_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for mine, live in zip(average.parameters(), tuned.parameters(), strict=True):
                mine.lerp_(live, 1 - settings.average)
        losses.append(loss.item())
        elapsed = time.perf_counter() - t0
        if kind == "step":
            yield TrainEvent(it + 1, settings.iterations, losses[-1], elapsed, kind)
        else:
            yield TrainEvent(done + it + 1, total, None, elapsed, kind)
    return average, losses


def _cross_validate(
    model: MedNCA, image: np.ndarray, target: np.ndarray, rows: list[int], inputs: torch.Tensor,
    onehot: torch.Tensor, settings: FinetuneSettings, seed: int, t0: float,
) -> Generator[TrainEvent, None, float | None]:
    """Whole-structure Dice on annotated slices of models trained without them: the slices are dealt into at
    most ``settings.folds`` groups (slice i to group i mod k, so each group spans the structure and its
    slices' nearest neighbours are in other groups), each segmented by a model trained on the others; the
    overlaps of all groups are pooled, as Dice over a volume pools its slices. None with a single slice."""
    n = len(inputs)
    k = min(settings.folds, n)
    if k < 2:
        return None
    total = np.zeros(2)
    for fold in range(k):
        held = list(range(fold, n, k))
        rest = [i for i in range(n) if i % k != fold]
        fold_model, _ = yield from _tune(model, inputs[rest], onehot[rest], settings, [seed, fold + 1], "fold", t0,
                                         fold * settings.iterations, k * settings.iterations)
        total += _overlap(fold_model, image, target, [rows[i] for i in held], seed, settings.runs)
    return _dice(total)


def _overlap(
    model: MedNCA, image: np.ndarray, target: np.ndarray, rows: list[int], seed: int, runs: int
) -> np.ndarray:
    """Twice the overlap and the total size of predicted and true structure (all classes together) on the
    slices ``rows`` (indices along the model's axis), summed over ``runs`` stochastic runs: Dice pooled over
    runs is steadier than one run's."""
    total = np.zeros(2)
    for run in range(runs):
        pred, truth = native_masks(model, image, target, seed + run, rows)
        pred, truth = pred.any(1), truth.any(1)
        total += (2 * (pred & truth).sum().item(), pred.sum().item() + truth.sum().item())
    return total


def _dice(overlap: np.ndarray) -> float:
    return 1.0 if overlap[1] == 0 else float(overlap[0] / overlap[1])


def _proximity(chosen: list[int], n: int) -> float:
    """How near the slices that were not annotated lie to annotated ones: the mean over them of
    1 - distance / gap, at least 0, where the gap is the mean distance of an annotated slice to its nearest
    annotated neighbour (how far the cross-validation's held-out slices are from the slices their models
    trained on). Slices beyond the annotated range by more than the gap (mostly empty) are left out."""
    gap = float(np.mean([min(abs(s - t) for t in chosen if t != s) for s in chosen]))
    others = [s for s in range(n) if s not in chosen and chosen[0] - gap <= s <= chosen[-1] + gap]
    if not others:
        return 1.0
    distance = np.array([min(abs(s - t) for t in chosen) for s in others])
    return float(np.mean(np.clip(1 - distance / gap, 0, 1)))


def advise(before: float, after: float | None, held_out: float | None, learned: float,
           settings: FinetuneSettings = FINETUNE) -> tuple[bool, str]:
    """Whether to use the adapted model, and why, in one line: ``before`` and ``after`` are the estimates of
    Dice on the unpainted slices (``FinetuneReport.estimate_before`` and ``estimate_after``), ``held_out``
    the cross-validation's Dice, ``learned`` the adapted model's Dice on the painted slices (pooled over
    runs as ``before`` is: ``FinetuneReport.learned_dice``)."""
    if after is None or held_out is None:
        return False, ("one annotated slice leaves none to check the adapted model on: annotate 2 or more "
                       "slices; keep the current model")
    expected = f"expected Dice on the slices it did not train on: {before:.3f} now, {after:.3f} adapted"
    if before < settings.poor_base and learned > before:
        return True, (f"the current model does poorly on the slices you painted (Dice {before:.3f}, the adapted "
                      f"model {learned:.3f}), and from such a start fine-tuning improved the other slices in "
                      f"testing even where the estimate did not say so ({expected}): use the adapted model")
    if held_out < before - settings.far_loss:
        return False, (f"the adapted model is not expected to be better ({expected}, but models trained without "
                       f"some annotated slices did worse on those: {held_out:.3f}): keep the current model")
    if after - before < settings.margin:
        return False, f"the adapted model is not expected to be better ({expected}): keep the current model"
    return True, f"{expected}: use the adapted model"


def _weights_digest(model: MedNCA) -> str:
    """The SHA-256 of a model's weights, as its file records it: names the base of a fine-tuned model."""
    return weights_digest(model.state_dict())
