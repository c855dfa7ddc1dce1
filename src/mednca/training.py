"""Training a Med-NCA model from labelled volumes (fine-tuning on a few slices: ``finetuning``).

The authors' recipe: level 0 runs on the whole downscaled slice, its state is upsampled, and level 1 runs
on a random crop of it only (the image at full size goes into channel 0), so a training step costs a
sixteenth of a full forward pass; the loss is BCE + (1 - soft Dice) on the level-1 crop, and both levels
learn end to end. ``Recipe()`` keeps that and converges faster on a CPU: most crops are centred near the
structure (a random crop of a 64x64 slice mostly shows background), warm-up then cosine learning rate,
clipped gradients, and augmentation (flips, gamma, contrast, smooth bias field, noise), with MRI artefacts
on a share of the slices where ``artefacts`` > 0, and thicker slices where ``thick_across`` > 0
(``mednca.augmentation``). ``AUTHORS_RECIPE`` is the plain recipe, for comparison.

All randomness (initial weights, batches, crops, augmentation, firing cells) comes from ``seed``, so the
same seed gives the same weights. The loop is a generator: the caller sees progress and cancels by no
longer iterating; the weights the caller handed in are never modified.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .augmentation import add_artefacts, augment, deform, thicken_across
from .checkpoint import save_model
from .data import (
    Case,
    SliceSet,
    build_slices,
    dataset_config,
    dataset_provenance,
    load_cases,
    split_cases,
)
from .data_parallel import BatchShare, join, start_workers
from .errors import CheckpointError, MedNCAError
from .model import MedNCA, NCAConfig
from .model_schema import check_inputs
from .preprocess import Preprocessing, restore_slices, scan_inputs
from .progress import run_to_end
from .staging import staged_file
from .step_paths import cpu_name

HIPPOCAMPUS = NCAConfig(output_channels=2, class_names=("anterior", "posterior"))
MEASURED_DICE = ("validation_dice_native", "validation_dice_model_space")  # provenance keys of measured results


@dataclass(frozen=True)
class Recipe:
    """How a model is trained. Learning rate follows a linear warm-up then a cosine (``schedule="cosine"``)
    or the authors' exponential decay (``"exponential"``, factor ``gamma`` per iteration). ``zero_fc1``
    starts a new model with its last layers at zero, as the authors do: every cell's first update is "no
    change" (a model to start from keeps its weights). ``artefacts`` is the share of training slices given
    one MRI artefact (spike, ghosting, motion, thick slices, blur, strong noise or inverted contrast), to
    make a model hold up on corrupted scans; ``thick_across`` the share replaced by what a scan of 2-5 times
    the slice spacing shows there (a blend of the slices around: ``augmentation.thicken_across``); ``spatial``
    the share given a random rotation, scale and shift (``augmentation.deform``). ``whole_dice`` weighs the
    Dice of the whole structure in the loss against one class's (``segmentation_loss``; 0 leaves it out)."""

    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.99)
    schedule: str = "cosine"
    warmup: int = 100
    final_lr_fraction: float = 0.05
    gamma: float = 0.9999
    crop: int = 16
    foreground_crops: float = 0.6
    augment: bool = True
    grad_clip: float | None = 1.0
    zero_fc1: bool = False
    artefacts: float = 0.0
    thick_across: float = 0.0
    spatial: float = 0.0
    whole_dice: float = 0.0

    def given(self, **options) -> Recipe:
        """This recipe with the options a command line was given; one left at None keeps this recipe's value."""
        return replace(self, **{name: value for name, value in options.items() if value is not None})

    def lr_at(self, iteration: int, total: int) -> float:
        if self.schedule == "exponential":
            return self.lr * self.gamma**iteration
        if iteration < self.warmup:
            return self.lr * (iteration + 1) / self.warmup
        t = (iteration - self.warmup) / max(1, total - self.warmup)
        floor = self.final_lr_fraction
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


AUTHORS_RECIPE = Recipe(
    lr=1.6e-3, betas=(0.5, 0.5), schedule="exponential", warmup=0, foreground_crops=0.0, augment=False,
    grad_clip=None, zero_fc1=True,
)


@dataclass
class TrainEvent:
    """Progress of training. ``val_dice`` (class name -> Dice on the validation slices, plus "whole") comes
    with ``kind="eval"`` events; ``loss`` is the mean training loss since the last event."""

    iteration: int
    total: int
    loss: float | None
    elapsed: float
    kind: str  # "step", "eval", "checkpoint", "done", or "fold" (fine-tuning's cross-validation models)
    val_dice: dict[str, float] | None = None


# ----------------------------------------------------------------------------------------------- forward


def crop_forward(
    model: MedNCA, images: torch.Tensor, origins: torch.Tensor | None, crop: int, gen: torch.Generator,
    part: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward pass: all levels but the last on the whole slice, the last on a ``crop``-sized window
    at ``origins [B, 2]`` (row, col) of the upsampled state, or on the whole slice when ``origins`` is None.
    Returns the logits of the last level and of level 0 (for the coarse auxiliary loss).

    The window is read from the coarser state directly (``_upsampled_window``): upsampling the whole state
    and cutting the window out of it gives the same numbers, forward and backward, but its backward pass
    fills a gradient the size of the whole upsampled batch for every window, a cost growing with the
    batch size squared (a quarter of a training step at batch 40).

    ``part`` computes only those batch items, drawing the firing cells of the whole batch: a process of
    data-parallel training draws what a single process would, and its generator stays in step."""
    cfg = model.config
    k = cfg.input_channels
    batch = images.shape[0]
    images = images[part]
    origins = None if origins is None else origins[part]
    state = None
    coarse = None
    for level, backbone in enumerate(model.backbones):
        size = cfg.level_size(level)
        img = images if size == tuple(images.shape[-2:]) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False
        )
        window = level == cfg.levels - 1 and origins is not None
        if window:
            img = crop_windows(img, origins, crop)
        if state is None:
            state = img.new_zeros((img.shape[0], cfg.channels, *img.shape[-2:]))
        elif window:
            state = _upsampled_window(state, origins, crop, cfg.downscale)
        else:
            state = F.interpolate(state, scale_factor=cfg.downscale, mode="nearest")
        state = state.contiguous(memory_format=torch.channels_last)
        state[:, :k] = img
        for _ in range(cfg.steps[level]):
            rand = torch.rand((batch, *img.shape[-2:]), generator=gen)[part]
            state = backbone.step(state, rand > cfg.fire_rate, k)
        if level == 0:
            coarse = state[:, k : k + cfg.output_channels]
    return state[:, k : k + cfg.output_channels], coarse


def crop_windows(x: torch.Tensor, origins: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The ``size`` windows of ``x [B, C, H, W]`` at ``origins [B, 2]`` (row, col), one per batch item, in one
    gather (its backward adds into one gradient of the input's size, not one per item)."""
    rows, cols = (size, size) if isinstance(size, int) else size
    r = origins[:, 0, None] + torch.arange(rows)
    c = origins[:, 1, None] + torch.arange(cols)
    b = torch.arange(x.shape[0])[:, None, None]
    return x[b, :, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _upsampled_window(coarse: torch.Tensor, origins: torch.Tensor, size: int, factor: int) -> torch.Tensor:
    """``crop_windows(F.interpolate(coarse, scale_factor=factor, mode="nearest"), origins, size)`` without the
    whole upsampled state: the coarse cells under each window are gathered, upsampled, and the window cut
    from them. Bit-identical forward and backward (the upsampling's backward adds up the same values of
    each cell's block in the same order; the gathers' backward only places values)."""
    h, w = coarse.shape[-2:]
    n_r, n_c = min(h, (size - 2) // factor + 2), min(w, (size - 2) // factor + 2)  # cells a window can touch
    start = torch.stack(((origins[:, 0] // factor).clamp(max=h - n_r), (origins[:, 1] // factor).clamp(max=w - n_c)), 1)
    cells = F.interpolate(crop_windows(coarse, start, (n_r, n_c)), scale_factor=factor, mode="nearest")
    return crop_windows(cells, origins - start * factor, size)


def crop_origins(labels: torch.Tensor, crop: int, foreground: float, gen: torch.Generator) -> torch.Tensor:
    """Top-left corners ``[B, 2]`` of the crops: with probability ``foreground`` a window holding a random
    labelled pixel (at a random place inside it), otherwise anywhere."""
    b, _, h, w = labels.shape
    fg = labels.amax(1).reshape(b, -1)
    out = torch.empty((b, 2), dtype=torch.long)
    u = torch.rand(b, generator=gen)
    for i in range(b):
        pix = fg[i].nonzero().squeeze(1)
        if u[i] < foreground and pix.numel():
            p = pix[torch.randint(pix.numel(), (1,), generator=gen)].item()
            off = torch.randint(crop, (2,), generator=gen)
            r, c = p // w - off[0].item(), p % w - off[1].item()
        else:
            r = torch.randint(h - crop + 1, (1,), generator=gen).item()
            c = torch.randint(w - crop + 1, (1,), generator=gen).item()
        out[i, 0] = min(max(r, 0), h - crop)
        out[i, 1] = min(max(c, 0), w - crop)
    return out


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, share: BatchShare | None = None, whole: float = 0.0
) -> torch.Tensor:
    """BCE with logits + (1 - soft Dice), Dice per class over the whole batch (smoothing 1), as the authors.

    With ``whole`` > 0 and several classes, the structure as a whole (the union of the classes, its probability
    1 - prod(1 - p)) is one more term of the Dice mean, weighing ``whole`` times a class's (1: one term among
    K + 1): per class, a pixel put in the wrong one of two classes that meet costs twice (a miss in one, a false
    alarm in the other) what a pixel missed at the structure's outline costs, though only the outline changes
    the structure's volume and whole Dice.

    With ``share`` (data-parallel training), ``logits`` and ``target`` are this process's part of the batch:
    the sums the loss is made of are added up over the processes, so the loss is the whole batch's, and
    its gradient with respect to this part is the whole loss's (the other parts' sums enter as constants)."""
    n = target.numel()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="mean" if share is None else "sum")
    p = torch.sigmoid(logits)
    weights = p.new_ones(p.shape[1])
    if whole and logits.shape[1] > 1:
        p, target = _with_whole(p, target)
        weights = torch.cat((weights, weights.new_tensor([float(whole)])))
    inter, p_sum, t_sum = (p * target).sum((0, 2, 3)), p.sum((0, 2, 3)), target.sum((0, 2, 3))
    if share is not None:
        mine = torch.cat((bce.reshape(1), logits.new_tensor([n]), inter, p_sum, t_sum))
        total = mine + (share.sum(mine) - mine.detach())
        bce = total[0] / total[1]
        inter, p_sum, t_sum = total[2:].split(p.shape[1])
    dice = (2 * inter + 1) / (p_sum + t_sum + 1)
    return bce + ((1 - dice) * weights).sum() / weights.sum()


def _with_whole(p: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and targets ``[N, K, ...]`` with the union of the classes as channel K + 1."""
    union = 1 - (1 - p).prod(1, keepdim=True)
    return torch.cat((p, union), 1), torch.cat((target, target.amax(1, keepdim=True)), 1)


# ------------------------------------------------------------------------------------------- evaluation


def hard_dice(pred: torch.Tensor, target: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Dice per class of boolean ``[N, K, ...]`` masks (all voxels pooled), plus "whole" for the union.
    Empty prediction and empty target count as 1."""

    def dice(a, b):
        total = a.sum().item() + b.sum().item()
        return 1.0 if total == 0 else 2 * (a & b).sum().item() / total

    out = {name: dice(pred[:, i], target[:, i]) for i, name in enumerate(names)}
    out["whole"] = dice(pred.any(1), target.any(1))
    return out


def predict_masks(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, K, ...]`` -> boolean masks, as inference labels voxels (``labels_from_probabilities``):
    one class, logit > 0; several, the most probable class where the class probabilities add up to more
    than 0.5."""
    if logits.shape[1] == 1:
        return logits > 0
    best = logits.argmax(1, keepdim=True)
    structure = torch.sigmoid(logits).sum(1, keepdim=True) > 0.5
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, best, True) & structure


@torch.no_grad()
def slice_logits(model: MedNCA, images: torch.Tensor, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """Full two-level forward of model-space slices, in batches, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([model(images[i : i + batch], generator=gen) for i in range(0, len(images), batch)])


def validation_dice(model: MedNCA, slices: SliceSet, seed: int = 0) -> dict[str, float]:
    """Dice in model space (64x64) over all validation slices: cheap enough to run during training."""
    pred = predict_masks(slice_logits(model, slices.images, seed))
    return hard_dice(pred, slices.labels.bool(), model.config.class_names)


@torch.no_grad()
def native_masks(
    model: MedNCA, image: np.ndarray, labels: np.ndarray, seed: int = 0, slices: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true boolean masks ``[N, K, h, w]`` of one volume (arrays in the model's orientation, as
    ``load_cases`` gives them) at its own resolution, predicted as inference does (probabilities resized
    bilinear to the native slice size, then labelled). ``slices`` (indices along the model's axis, default all)
    picks the slices to predict; they are prepared within the whole volume, so they read their real
    neighbours and the volume's statistics."""
    axis = model.preprocessing.axis
    inputs = scan_inputs(image, axis, model.config.input_size, model.preprocessing)
    lab = torch.from_numpy(np.moveaxis(np.asarray(labels), axis, 0).astype(np.int64)).unsqueeze(1)
    if slices is not None:
        inputs, lab = inputs[list(slices)], lab[list(slices)]
    prob = restore_slices(torch.sigmoid(slice_logits(model, inputs, seed)), tuple(lab.shape[-2:]))
    pred = predict_masks(torch.logit(prob.clamp(1e-6, 1 - 1e-6)))
    k = model.config.output_channels
    target = (lab > 0) if k == 1 else lab == torch.arange(1, k + 1).view(1, k, 1, 1)
    return pred, target


def native_dice(
    model: MedNCA, image: np.ndarray, labels: np.ndarray, seed: int = 0, slices: Sequence[int] | None = None
) -> dict[str, float]:
    """Dice of one volume (arrays in the model's orientation) at its own resolution, over ``slices`` (default
    all; see ``native_masks``)."""
    return hard_dice(*native_masks(model, image, labels, seed, slices), model.config.class_names)


# -------------------------------------------------------------------------------------------- training


def new_model(config: NCAConfig, prep: Preprocessing, seed: int) -> MedNCA:
    """A freshly initialised model whose weights depend only on ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MedNCA(config, preprocessing=prep)


def _prepare_data(data, config: NCAConfig, prep: Preprocessing) -> SliceSet:
    if isinstance(data, SliceSet):
        return data
    if isinstance(data, list | tuple) and data and all(isinstance(c, Case) for c in data):
        return build_slices(data, config, prep)
    return build_slices(load_cases(data, prep.orientation), config, prep)


def train_iter(
    data,
    *,
    config: NCAConfig | None = None,
    preprocessing: Preprocessing | None = None,
    recipe: Recipe | None = None,
    val_fraction: float = 0.1,
    iterations: int = 20000,
    batch_size: int = 16,
    lr: float | None = None,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    eval_every: int = 1000,
    best_path: str | os.PathLike | None = None,
    eval_slices: int | None = 256,
    init_model: MedNCA | None = None,
    log_every: int = 50,
    provenance: dict | None = None,
    workers: int = 1,
) -> Generator[TrainEvent, None, MedNCA]:
    """Train a model; yields ``TrainEvent``s and returns the trained model.

    ``data`` is a Decathlon task folder, a list of (image, label) Volumes or paths, of ``Case``s, or a
    ``SliceSet``.
    Validation cases (``val_fraction`` of them, seeded) never contribute a training slice; their ids go into
    the model's provenance. With ``checkpoint_path``, the full training state is saved atomically every
    ``checkpoint_every`` iterations and ``resume=True`` continues from it (a fresh start if it does not exist
    yet). With ``best_path``, the model with the best validation Dice so far is written there at every eval.
    Evals during training use ``eval_slices`` evenly spaced validation slices (all when None): a full forward
    of every validation slice costs as much as hundreds of training steps.
    ``init_model`` starts from its weights (a copy: it is never modified); its provenance is kept whole under
    ``started_from``. ``provenance`` (e.g. the data and its licence) is added to the model's provenance with
    the training setup.
    Without ``config``, a Decathlon folder's dataset.json names the classes (its name and licence go into
    the provenance); other data gets the two-class hippocampus architecture; either reads as many input
    channels as ``preprocessing`` gives (the slice and its neighbours).
    ``workers`` > 1 shares every batch among that many processes (this one and ``workers - 1`` started for
    the run, each on one torch thread; give this one a single thread too): they draw the same batches,
    crops and firing cells as one process would, so the training is the same up to rounding, and a
    checkpoint resumes with any number of workers. Two processes spend 1.1 to 1.25 times the CPU of one per
    sample, so on two free cores they should train 1.6 to 1.8 times as fast, where two threads in one
    process do not (``mednca.data_parallel``).
    """
    if init_model is not None:
        config, preprocessing = init_model.config, init_model.preprocessing
    prep = preprocessing or Preprocessing()
    if config is None:
        base = dataset_config(data) if isinstance(data, str | os.PathLike) else HIPPOCAMPUS
        config = replace(base, input_channels=prep.input_channels)
    if isinstance(data, str | os.PathLike):
        provenance = {**dataset_provenance(data), **(provenance or {})}
    recipe = recipe or Recipe()
    if lr is not None:
        recipe = Recipe(**{**asdict(recipe), "lr": lr})
    if not 1 <= recipe.crop <= min(config.input_size):
        raise MedNCAError(f"the training crop must be 1 to {min(config.input_size)} pixels, not {recipe.crop}")
    if not 0.0 <= recipe.artefacts <= 1.0:
        raise MedNCAError(f"the share of slices with artefacts must be 0 to 1, not {recipe.artefacts}")
    if not 0.0 <= recipe.thick_across <= 1.0:
        raise MedNCAError(f"the share of thickened slices must be 0 to 1, not {recipe.thick_across}")
    if not 0.0 <= recipe.spatial <= 1.0:
        raise MedNCAError(f"the share of slices given a new shape or pose must be 0 to 1, not {recipe.spatial}")
    if not 0.0 <= recipe.whole_dice <= 100.0:
        raise MedNCAError(f"the whole structure's Dice weight must be 0 to 100, not {recipe.whole_dice}")
    if not 1 <= workers <= batch_size:
        raise MedNCAError(f"training needs 1 to batch size ({batch_size}) worker processes, not {workers}")
    check_inputs(config.input_channels, prep.context)  # before the data are read, not after
    slices = _prepare_data(data, config, prep)
    train_cases, val_cases = split_cases(len(slices.case_ids), val_fraction, seed)
    train, val = slices.subset(train_cases), slices.subset(val_cases)
    probe = val if eval_slices is None or len(val) <= eval_slices else val.pick(
        torch.linspace(0, len(val) - 1, eval_slices).round().long()
    )
    if len(train) == 0:
        raise MedNCAError("no training slices: give more cases or a smaller val_fraction")

    model = copy.deepcopy(init_model) if init_model is not None else new_model(config, prep, seed)
    if init_model is not None:  # the start's own results (its Dice, its command) do not describe the new weights
        model.provenance = {"started_from": model.provenance}
    elif recipe.zero_fc1:
        with torch.no_grad():
            for level in model.backbones:
                level.fc1.weight.zero_()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas)
    gen = torch.Generator().manual_seed(seed)
    start, best, spent = 0, -1.0, 0.0
    setup = {
        "config": config.to_dict(), "preprocessing": prep.to_dict(), "recipe": asdict(recipe), "seed": seed,
        "iterations": iterations, "batch_size": batch_size, "validation_cases": val.case_ids,
        "provenance": provenance or {},
    }
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        start, best, spent = load_training_state(checkpoint_path, model, opt, gen, setup)

    share, pool = None, None
    if workers > 1 and start < iterations:
        # copies: a tensor sent to another process shares its memory with it (the slices are only read)
        share, pool = start_workers(workers, _train_worker, {
            "model": copy.deepcopy(model), "optimizer": copy.deepcopy(opt.state_dict()), "rng": gen.get_state(),
            "train": train, "recipe": recipe, "batch_size": batch_size, "start": start, "iterations": iterations,
        })
    t0 = time.perf_counter() - spent
    running, n_running = 0.0, 0
    final_dice = None  # the probe's Dice of the final weights, when the last iteration was evaluated here
    try:
        for it in range(start, iterations):
            _set_lr(opt, recipe, it, iterations)
            loss = _train_step(model, opt, train, batch_size, recipe, gen, share)
            running += loss
            n_running += 1
            done = it + 1
            if done % log_every == 0 or done == iterations:
                yield TrainEvent(done, iterations, running / n_running, time.perf_counter() - t0, "step")
                running, n_running = 0.0, 0
            if len(val) and (done % eval_every == 0 or done == iterations):
                model.eval()
                dice = validation_dice(model, probe, seed)
                model.train()
                final_dice = dice if done == iterations else None
                if best_path is not None and dice["whole"] > best:
                    best = dice["whole"]
                    _stamp(model, setup, done, time.perf_counter() - t0, dice, workers)
                    save_model(model, best_path)
                yield TrainEvent(done, iterations, None, time.perf_counter() - t0, "eval", dice)
            if checkpoint_path is not None and (done % checkpoint_every == 0 or done == iterations):
                save_training_state(checkpoint_path, model, opt, gen, setup, done, best, time.perf_counter() - t0)
                yield TrainEvent(done, iterations, None, time.perf_counter() - t0, "checkpoint")
    finally:  # also when the caller stops iterating: the workers would wait for this process
        if pool is not None:
            pool.stop()
    model.eval()
    for key in MEASURED_DICE:  # a best checkpoint's (or the starting model's) Dice is not these weights'
        model.provenance.pop(key, None)
    _stamp(model, setup, iterations, time.perf_counter() - t0, final_dice, workers)
    yield TrainEvent(iterations, iterations, None, time.perf_counter() - t0, "done")
    return model


def _stamp(model: MedNCA, setup: dict, iteration: int, seconds: float, dice: dict | None, processes: int) -> None:
    """Record where the weights came from in the model itself."""
    model.provenance.update(
        **setup["provenance"],
        source="trained with mednca.training",
        iterations=iteration,
        planned_iterations=setup["iterations"],
        train_seconds=round(seconds, 1),
        training_processes=processes,
        trained_on=where_trained(processes),
        seed=setup["seed"],
        batch_size=setup["batch_size"],
        recipe=setup["recipe"],
        validation_cases=setup["validation_cases"],
    )
    if dice is not None:
        model.provenance["validation_dice_model_space"] = {k: round(v, 4) for k, v in dice.items()}


def where_trained(processes: int) -> str:
    """The machine a model was trained on, for its provenance: the CPU, the processes and their threads,
    torch's version (training here runs on the CPU)."""
    threads = 1 if processes > 1 else torch.get_num_threads()
    return (f"CPU: {cpu_name()}, {processes} process(es) of {threads} thread(s), "
            f"torch {torch.__version__}")


def _set_lr(opt: torch.optim.Optimizer, recipe: Recipe, iteration: int, total: int) -> None:
    for g in opt.param_groups:
        g["lr"] = recipe.lr_at(iteration, total)


def _train_step(
    model, opt, train: SliceSet, batch_size: int, recipe: Recipe, gen, share: BatchShare | None = None
) -> float:
    """One optimiser step on a random batch; returns its loss. With ``share``, this process draws the whole
    batch (as every process does, so their generators stay in step) and computes its part of it."""
    idx = torch.randint(len(train), (batch_size,), generator=gen)
    images = thicken_across(train.images, train.case_index, idx, recipe.thick_across, gen)
    labels = train.labels[idx].float()
    if recipe.augment:
        images, labels = augment(images, labels, gen)
    images, labels = deform(images, labels, recipe.spatial, gen)
    images = add_artefacts(images, recipe.artefacts, gen)
    origins = crop_origins(labels, recipe.crop, recipe.foreground_crops, gen)
    part = slice(None) if share is None else share.part(batch_size)
    logits, _ = crop_forward(model, images, origins, recipe.crop, gen, part)
    loss = segmentation_loss(logits, crop_windows(labels[part], origins[part], recipe.crop), share,
                             recipe.whole_dice)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if share is not None:
        share.sum_gradients(model.parameters())
    if recipe.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    opt.step()
    return loss.item()


def _train_worker(rank: int, size: int, store_path: str, ready, payload: dict) -> None:
    """A data-parallel training process beyond the first: ``train_iter``'s steps on its part of every batch,
    from the state rank 0 had when it started them; evaluation, checkpoints and events stay with rank 0.
    Ctrl-C is rank 0's to handle (it ends the workers). When rank 0 is gone (killed, or its machine asleep
    past the time-out), this process ends with one line, not a traceback: rank 0 tells the user what happened
    when it is there to."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    model, recipe, total = payload["model"].train(), payload["recipe"], payload["iterations"]
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas)
    opt.load_state_dict(payload["optimizer"])
    gen = torch.Generator()
    gen.set_state(payload["rng"])
    ready.put(rank)
    share = join(store_path, rank, size)
    try:
        for it in range(payload["start"], total):
            _set_lr(opt, recipe, it, total)
            _train_step(model, opt, payload["train"], payload["batch_size"], recipe, gen, share)
    except MedNCAError as e:
        sys.exit(f"mednca training process {rank}: stopped: {e}")


def train(data, **kwargs) -> MedNCA:
    """``train_iter`` run to the end; returns the trained model."""
    return run_to_end(train_iter(data, **kwargs))


# ------------------------------------------------------------------------------------ training state


def save_training_state(path, model, opt, gen, setup: dict, iteration: int, best: float, seconds: float) -> None:
    """Model, optimiser moments, RNG state and progress in one safetensors file (JSON metadata, no pickle),
    written atomically so an interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p)
        if st:
            tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    tensors["rng"] = gen.get_state()
    meta = {"setup": setup, "iteration": iteration, "best": best, "seconds": seconds}
    with staged_file(path) as tmp:
        save_file(tensors, tmp, metadata={"mednca_training": json.dumps(meta)})


def read_training_state(path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata (setup, iteration, best, seconds) and, with ``tensors``, the tensors of a checkpoint
    ``save_training_state`` wrote; the model's weights are those named ``model.*`` (``state_weights``)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["mednca_training"])
            return meta, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is not a training checkpoint ({e})") from None


def state_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict among a training checkpoint's tensors."""
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


def load_training_state(path, model, opt, gen, setup: dict) -> tuple[int, float, float]:
    """Restore what ``save_training_state`` wrote; refuses a checkpoint of a different training setup."""
    meta, tensors = read_training_state(path)
    theirs = {k: v for k, v in meta["setup"].items() if k != "iterations"}
    if isinstance(theirs.get("recipe"), dict):  # recipe settings added since: their defaults are what it used
        theirs["recipe"] = {**json.loads(json.dumps(asdict(Recipe()))), **theirs["recipe"]}
    ours = json.loads(json.dumps({k: v for k, v in setup.items() if k != "iterations"}))
    if theirs != ours:
        changed = sorted(k for k in ours if theirs.get(k) != ours[k])
        if "recipe" in changed and isinstance(theirs.get("recipe"), dict):  # say which setting, then and now
            changed.remove("recipe")
            changed += [f"recipe {k}: {theirs['recipe'].get(k)} then, {v} now"
                        for k, v in ours["recipe"].items() if theirs["recipe"].get(k) != v]
        raise CheckpointError(f"{path} was saved by a different training setup (differs in {'; '.join(changed)})")
    model.load_state_dict(state_weights(tensors))
    for i, p in enumerate(model.parameters()):
        if f"adam.{i}.exp_avg" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(tensors[f"adam.{i}.step"].item())),
                "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone(),
            }
    gen.set_state(tensors["rng"])
    return int(meta["iteration"]), float(meta["best"]), float(meta["seconds"])
