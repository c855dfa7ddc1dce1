"""Train the shipped hippocampus model (2 classes: anterior, posterior) and log its provenance.

Run on one CPU thread so the machine stays usable; the best model so far (by whole-hippocampus Dice on
validation slices) is written at every eval, so stopping the run at any time leaves a usable model.
Resumable: rerun the same command to continue from the last checkpoint. At the end, every validation case
is segmented at its native resolution and its Dice logged.

    python benchmarks/train_hippocampus.py DATA_DIR OUT_DIR [ITERATIONS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from mednca.checkpoint import load_model_file
from mednca.data import load_cases
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


def main(data: str, out: str, iterations: int = 10000) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe()
    log(f"data {data}; recipe {recipe}; iterations {iterations}; batch 16; torch threads 1")
    cases = load_cases(data)
    gen = train_iter(
        cases, config=HIPPOCAMPUS, recipe=recipe, iterations=iterations, batch_size=16, val_fraction=0.1, seed=0,
        checkpoint_path=out / "training_state.safetensors", checkpoint_every=250, resume=True, eval_every=500,
        eval_slices=96, best_path=out / "best.safetensors", provenance=DATA_NOTE, log_every=100,
    )
    try:
        while True:
            ev = next(gen)
            if ev.kind == "step":
                log(f"it {ev.iteration}/{ev.total} loss {ev.loss:.4f} {ev.elapsed:.0f}s")
            elif ev.kind == "eval":
                log(f"it {ev.iteration} validation Dice (64x64, 96 slices) {fmt(ev.val_dice)}")
    except StopIteration as stop:
        model = stop.value
    log(f"done; validation cases: {model.provenance['validation_cases']}")
    best = load_model_file(out / "best.safetensors")
    dice = best.provenance.get("validation_dice_model_space")
    log(f"best model: {best.provenance.get('iterations')} iterations, {dice}")
    val = set(model.provenance["validation_cases"])
    evaluate_native(best, [c for c in cases if c.case_id in val])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
