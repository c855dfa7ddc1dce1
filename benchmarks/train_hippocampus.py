"""Train the shipped hippocampus model (2 classes: anterior, posterior) and log its provenance.

Run on one CPU thread so the machine stays usable; the best model so far (by whole-hippocampus Dice on
validation slices) is written at every eval, so stopping the run at any time leaves a usable model.
Resumable: rerun the same command to continue from the last checkpoint. At the end, every validation case
is segmented at its native resolution and its Dice logged.

    python benchmarks/train_hippocampus.py DATA_DIR OUT_DIR [ITERATIONS] [--init MODEL] [--crop N] [--no-augment]
                                           [--lr LR] [--threads N] [--eval-every N] [--eval-slices N]

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
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mednca.checkpoint import load_model_file, save_model
from mednca.data import load_cases
from mednca.registry import load_model
from mednca.training import HIPPOCAMPUS, Recipe, native_dice, train_iter

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("out", type=Path)
    parser.add_argument("iterations", type=int, nargs="?", default=10000)
    parser.add_argument("--init", default=None, help="start from this model (a name, file or folder)")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-slices", type=int, default=96)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    changes = {"crop": args.crop, "lr": args.lr, "augment": False if args.no_augment else None}
    recipe = replace(Recipe(), **{k: v for k, v in changes.items() if v is not None})
    init = None if args.init is None else load_model(args.init)
    log(f"data {args.data}; recipe {recipe}; iterations {args.iterations}; batch 16; torch threads {args.threads}; "
        f"init {args.init}")
    cases = load_cases(args.data)
    gen = train_iter(
        cases, config=HIPPOCAMPUS, recipe=recipe, iterations=args.iterations, batch_size=16, val_fraction=0.1, seed=0,
        checkpoint_path=out / "training_state.safetensors", checkpoint_every=250, resume=True,
        eval_every=args.eval_every, eval_slices=args.eval_slices, best_path=out / "best.safetensors",
        provenance=DATA_NOTE, log_every=100, init_model=init,
    )
    try:
        while True:
            ev = next(gen)
            if ev.kind == "step":
                log(f"it {ev.iteration}/{ev.total} loss {ev.loss:.4f} {ev.elapsed:.0f}s")
            elif ev.kind == "eval":
                log(f"it {ev.iteration} validation Dice (64x64, {args.eval_slices} slices) {fmt(ev.val_dice)}")
    except StopIteration as stop:
        model = stop.value
    save_model(model, out / "final.safetensors")
    log(f"done; final weights in {out / 'final.safetensors'}; validation cases: {model.provenance['validation_cases']}")
    best = load_model_file(out / "best.safetensors")
    dice = best.provenance.get("validation_dice_model_space")
    log(f"best model: {best.provenance.get('iterations')} iterations, {dice}")
    val = set(model.provenance["validation_cases"])
    evaluate_native(best, [c for c in cases if c.case_id in val])


if __name__ == "__main__":
    main()
