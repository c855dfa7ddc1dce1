"""Train the shipped hippocampus model (2 classes: anterior, posterior) and log its provenance.

Run on one CPU thread so the machine stays usable; the best model so far (by whole-hippocampus Dice on
validation slices) is written at every eval, so stopping the run at any time leaves a usable model.
Resumable: rerun the same command to continue from OUT_DIR/training_state.safetensors (saved every 250
iterations); a checkpoint of another recipe, batch size or model is refused. A fresh start from --init first
logs that model's Dice on the validation probe, the baseline the run's evals compare with. At the end, every
validation case is segmented at its native resolution and its Dice logged.

    python benchmarks/train_hippocampus.py DATA_DIR OUT_DIR [ITERATIONS] [--init MODEL] [--authors-recipe]
        [--crop N] [--augment | --no-augment]
        [--artefacts F] [--thick-across F] [--spatial F] [--whole-dice [W]] [--one-class] [--lr LR]
        [--schedule cosine|exponential] [--final-lr-fraction F] [--batch N] [--threads N] [--workers N] [--eval-every N]
        [--eval-slices N] [--snapshots-from N]

--snapshots-from N keeps the weights at every eval from iteration N on as OUT_DIR/snapshot_ITERATION.safetensors,
for averaging the last checkpoints of a run (it changes nothing in the training, so a run resumes with or
without it).

--authors-recipe starts from the authors' recipe (``AUTHORS_RECIPE``: lr 1.6e-3, Adam betas 0.5/0.5, exponential
decay 0.9999 per iteration, no warm-up, no gradient clipping, fc1 at zero in a new model, uniform 16x16 crops, no
augmentation) instead of ours; every option given changes it as it changes ours (e.g. --augment --artefacts 0.25).

--one-class trains the whole hippocampus as one class (the authors' output), anterior and posterior merged;
from --init, the two-class model's weights are kept and its first output channel becomes the structure's. It
measures what separating the two classes costs the structure's outline: a one-class model is not a default
(volumetry needs both parts).

--workers N shares every batch among N one-thread processes (mednca.data_parallel): the same training up to
rounding, and a checkpoint resumes with any number of workers.

The shipped models took two stages each (logs in benchmarks/results/). Stage 1, from scratch with the default recipe:
    python benchmarks/train_hippocampus.py DATA OUT1 10500
then, from stage 1's final weights, `hippocampus` (the default) on 32x32 windows of the fine level with augmentation,
    python benchmarks/train_hippocampus.py DATA OUT3 8000 --init OUT1/final.safetensors --crop 32 --lr 1e-3 \
        --eval-every 1000 --eval-slices 256
and `hippocampus_msd` on 32x32 windows without augmentation,
    python benchmarks/train_hippocampus.py DATA OUT2 17000 --init OUT1/final.safetensors --crop 32 --no-augment \
        --lr 1e-3 --eval-every 1000 --eval-slices 256
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mednca.checkpoint import load_model_file, save_model
from mednca.data import build_slices, load_cases, split_cases
from mednca.errors import MedNCAError
from mednca.preprocess import Preprocessing
from mednca.registry import load_model
from mednca.training import (
    AUTHORS_RECIPE,
    HIPPOCAMPUS,
    MEASURED_DICE,
    Recipe,
    native_dice,
    read_training_state,
    state_weights,
    train_iter,
    validation_dice,
)

VAL_FRACTION, SEED = 0.1, 0
WHOLE = ("hippocampus",)  # --one-class: the class name of the merged structure

DATA_NOTE = {"data": "MSD Task04 Hippocampus, CC-BY-SA 4.0", "licence_of_weights_data": "CC-BY-SA 4.0"}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} {msg}", flush=True)


def fmt(dice: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in dice.items())


def evaluate_native(model, cases) -> None:
    """Dice per validation case at native resolution, and the mean over cases."""
    rows = []
    for case in cases:
        d = native_dice(model, case.image, case.labels, seed=0)
        rows.append(d)
        log(f"  {case.case_id}: " + fmt(d))
    for key in ("whole", *model.config.class_names):
        vals = np.array([r[key] for r in rows])
        log(f"native Dice, {len(rows)} validation cases, {key}: mean {vals.mean():.4f} median {np.median(vals):.4f}")


def baseline_probe_dice(model, cases, eval_slices: int) -> dict:
    """The starting model's Dice on the validation probe train_iter evaluates (same split, same evenly
    spaced slices), so the first evals of a run that starts from a trained model have a reference."""
    slices = build_slices(cases, model.config, model.preprocessing)
    val = slices.subset(split_cases(len(slices.case_ids), VAL_FRACTION, SEED)[1])
    if len(val) > eval_slices:
        val = val.pick(torch.linspace(0, len(val) - 1, eval_slices).round().long())
    return validation_dice(model.eval(), val, SEED)


def checkpoint_progress(path: Path) -> tuple[int, int] | None:
    """(iteration reached, iterations planned) of a training checkpoint, None when there is none yet."""
    if not path.exists():
        return None
    meta, _ = read_training_state(path, tensors=False)
    return int(meta["iteration"]), int(meta["setup"]["iterations"])


def save_snapshot(state: Path, best: Path, out: Path) -> None:
    """The weights of training checkpoint ``state`` as a model file ``out``: the architecture, preprocessing and
    provenance of the run's best model ``best`` (both come from the same run), its measured Dice left out."""
    model = load_model_file(best)
    meta, tensors = read_training_state(state)
    iteration = int(meta["iteration"])
    model.load_state_dict(state_weights(tensors))
    model.provenance = {**{k: v for k, v in model.provenance.items() if k not in MEASURED_DICE},
                        "iterations": iteration, "snapshot": f"the weights at iteration {iteration} of the run"}
    save_model(model, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("out", type=Path)
    parser.add_argument("iterations", type=int, nargs="?", default=10000)
    parser.add_argument("--init", default=None, help="start from this model (a name, file or folder)")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--foreground-crops", type=float, default=None, metavar="SHARE",
                        help="share of crops on a labelled pixel, the rest anywhere (0: uniform, as the authors)")
    parser.add_argument("--authors-recipe", action="store_true",
                        help="start from the authors' recipe instead of ours (the other options change it)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="flips, gamma, contrast, bias field and noise (ours: on; the authors': off)")
    parser.add_argument("--artefacts", type=float, default=None, help="share of slices given an MRI artefact")
    parser.add_argument("--thick-across", type=float, default=None, help="share of slices thickened across slices")
    parser.add_argument("--spatial", type=float, default=None, help="share of slices rotated, scaled and shifted")
    parser.add_argument("--whole-dice", type=float, nargs="?", const=1.0, default=None, metavar="W",
                        help="add the whole structure's Dice to the loss, weighing W times a class's (default 1)")
    parser.add_argument("--one-class", action="store_true",
                        help="train the whole structure as one class (anterior and posterior merged)")
    parser.add_argument("--context", type=int, default=0, metavar="N",
                        help="a new model reads N neighbouring slices on each side (--init: the model's own)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                        help="NCA steps per level, coarse first (the model keeps them for inference)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--schedule", choices=("cosine", "exponential"), default=None)
    parser.add_argument("--final-lr-fraction", type=float, default=None, help="cosine: end at this share of --lr")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="data-parallel processes, one thread each")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-slices", type=int, default=96)
    parser.add_argument("--snapshots-from", type=int, default=None, metavar="N",
                        help="keep the weights at every eval from iteration N on (snapshot_ITERATION.safetensors)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.workers > 1 and args.threads != 1:
        parser.error("--workers runs one thread per process: leave --threads at 1")
    changes = {"crop": args.crop, "foreground_crops": args.foreground_crops, "lr": args.lr,
               "augment": args.augment,
               "schedule": args.schedule, "final_lr_fraction": args.final_lr_fraction, "artefacts": args.artefacts,
               "thick_across": args.thick_across, "spatial": args.spatial,
               "whole_dice": args.whole_dice}
    recipe = (AUTHORS_RECIPE if args.authors_recipe else Recipe()).given(**changes)
    init = None if args.init is None else load_model(args.init)
    if init is not None and args.context not in (0, init.preprocessing.context):
        parser.error(f"--init {args.init} reads {init.preprocessing.context} neighbouring slices on each side")
    rebind = {**({"output_channels": 1, "class_names": WHOLE} if args.one_class else {}),
              **({"steps": tuple(args.steps)} if args.steps else {})}
    prep = Preprocessing(context=args.context)
    config = replace(HIPPOCAMPUS, **rebind, input_channels=prep.input_channels)
    if init is not None and rebind:
        init.config = replace(init.config, **rebind)
    state = out / "training_state.safetensors"
    log(f"data {args.data}; recipe {recipe}; iterations {args.iterations}; batch {args.batch}; "
        f"torch threads {args.threads}; workers {args.workers}; init {args.init}")
    cases = load_cases(args.data)
    progress = checkpoint_progress(state)
    if progress is not None:
        log(f"resuming from {state} at iteration {progress[0]} (planned then: {progress[1]})")
    elif init is not None:
        log(f"it 0 validation Dice (64x64, {args.eval_slices} slices) "
            f"{fmt(baseline_probe_dice(init, cases, args.eval_slices))} (the starting model {args.init})")
    gen = train_iter(
        cases, config=config, recipe=recipe, iterations=args.iterations, batch_size=args.batch,
        preprocessing=prep, val_fraction=VAL_FRACTION, seed=SEED,
        checkpoint_path=state, checkpoint_every=250, resume=True,
        eval_every=args.eval_every, eval_slices=args.eval_slices, best_path=out / "best.safetensors",
        provenance=DATA_NOTE, log_every=100, init_model=init, workers=args.workers,
    )
    try:
        while True:
            ev = next(gen)
            if ev.kind == "step":
                log(f"it {ev.iteration}/{ev.total} loss {ev.loss:.4f} {ev.elapsed:.0f}s")
            elif ev.kind == "eval":
                log(f"it {ev.iteration} validation Dice (64x64, {args.eval_slices} slices) {fmt(ev.val_dice)}")
            elif (ev.kind == "checkpoint" and args.snapshots_from is not None and ev.iteration >= args.snapshots_from
                  and ev.iteration % args.eval_every == 0):
                save_snapshot(state, out / "best.safetensors", out / f"snapshot_{ev.iteration}.safetensors")
    except StopIteration as stop:
        model = stop.value
    except MedNCAError as e:  # e.g. a checkpoint saved with another recipe: say so instead of a traceback
        sys.exit(f"train_hippocampus: error: {e}")
    save_model(model, out / "final.safetensors")
    log(f"done; final weights in {out / 'final.safetensors'}; validation cases: {model.provenance['validation_cases']}")
    best = load_model_file(out / "best.safetensors")
    dice = best.provenance.get("validation_dice_model_space")
    log(f"best model: {best.provenance.get('iterations')} iterations, {dice}")
    val = set(model.provenance["validation_cases"])
    evaluate_native(best, [c for c in cases if c.case_id in val])


if __name__ == "__main__":
    main()
