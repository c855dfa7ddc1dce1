"""Would the neighbouring slices help? A paired measurement from scratch, before any engine work on it.

    python benchmarks/context_slices.py DATA_DIR --arm single|context [--iterations 5000] [--warm] [--out DIR]

Med-NCA reads one slice: the hippocampus is a 3D structure, and a cell on an unclear outline sees nothing of the
slices above and below. ``context`` gives the same architecture and parameter count (70,016) the slice and its two
neighbours as three fixed input channels (29 hidden channels instead of 31); ``single`` is the default's one
channel. Both arms train from the same seeded weights on the same batches, crops and firing cells (one generator
drives both), with the default's held-out split, no augmentation (it would need to move the neighbours with the
slice) and the recipe otherwise the default's. Run the two arms at once, one per core; each logs its probe Dice
(64x64, 256 held-out slices) to OUT/ARM.log and ends with native whole Dice on the 21 held-out cases (one run, seed 0).

``--warm`` starts both arms from the shipped default instead (lr 2e-4, cosine to 5%, uniform crops, the logs
``OUT/warm_ARM.log``): ``context`` gets its weights by ``widen``, which moves the state's channels up by two for
the neighbours (their weights at zero) and drops the two hidden channels whose removal costs the default least.

It was written before the engine read neighbours and answered whether that was worth building; it now builds the
``context`` arm with the engine's own ``Preprocessing(context=1)``, which stacks the channels in the same order
(the slice before, the slice, the slice after; at a scan's ends the slice itself stands in). It saves no model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mednca.data import build_slices, load_cases
from mednca.model import MedNCA, NCAConfig
from mednca.preprocess import Preprocessing
from mednca.registry import load_model
from mednca.training import HIPPOCAMPUS, Recipe, native_dice, train_iter

VAL_FRACTION, SEED = 0.1, 0  # the shipped models' split (train_hippocampus.py)
DROPPED = (3, 26)  # hidden channels of the stage-16 default that cost least when zeroed: probe 0.8851 -> 0.8821


def widen(model: MedNCA, config: NCAConfig) -> MedNCA:
    """``model`` (one input channel) rewired to read three, in ``preprocess.with_neighbours``'s order: its image channel
    becomes the centre one (1), its other channels move up to 3 and on in order (the ``DROPPED`` ones go), and
    every weight reading the neighbours (channels 0 and 2) is zero, so the wider model computes what ``model``
    computes with the ``DROPPED`` channels held at zero."""
    c = config.channels
    kept = [0] + [j for j in range(1, c) if j not in DROPPED]  # old channels, in order
    new_of = [1] + list(range(3, c))  # where each kept one goes
    wide = MedNCA(config, preprocessing=replace(model.preprocessing, context=1))
    with torch.no_grad():
        for old, new in zip(model.backbones, wide.backbones, strict=True):
            for name in ("perceive.bias", "fc0.bias"):
                new.get_parameter(name).copy_(old.get_parameter(name))
            new.perceive.weight.zero_()
            new.perceive.weight[:, new_of] = old.perceive.weight[:, kept]
            new.fc0.weight.zero_()
            new.fc0.weight[:, new_of] = old.fc0.weight[:, kept]
            new.fc0.weight[:, c:] = old.fc0.weight[:, c:]  # the perception's part: its outputs keep their order
            new.fc1.weight.zero_()
            new.fc1.weight[new_of] = old.fc1.weight[kept]
    return wide


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--arm", choices=("single", "context"), required=True)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warm", action="store_true", help="start from the shipped default (see the docstring)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "context_slices")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{'warm_' if args.warm else ''}{args.arm}.log"

    def log(line: str) -> None:
        with log_path.open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    context = args.arm == "context"
    config = replace(HIPPOCAMPUS, input_channels=3 if context else 1)
    prep = Preprocessing(context=1 if context else 0)
    recipe = Recipe(crop=32, augment=False, whole_dice=6.0)
    init = None
    if args.warm:
        init = load_model("hippocampus")
        config = replace(init.config, input_channels=config.input_channels)
        prep = replace(init.preprocessing, context=prep.context)
        init = widen(init, config) if context else init
        recipe = replace(recipe, lr=2e-4, foreground_crops=0.0)
    cases = load_cases(args.data, prep.orientation)
    slices = build_slices(cases, config, prep)
    log(f"arm {args.arm}; input channels {config.input_channels}; recipe {recipe}; iterations {args.iterations}; "
        f"batch {args.batch}; {len(cases)} cases")
    run = train_iter(slices, config=config, preprocessing=prep, recipe=recipe, iterations=args.iterations,
                     batch_size=args.batch, val_fraction=VAL_FRACTION, seed=SEED, eval_every=500, eval_slices=256,
                     log_every=100, init_model=init)
    try:
        while True:
            ev = next(run)
            if ev.kind == "eval":
                d = ev.val_dice
                log(f"it {ev.iteration} probe whole {d['whole']:.4f} anterior {d['anterior']:.4f} "
                    f"posterior {d['posterior']:.4f} {ev.elapsed:.0f}s")
    except StopIteration as stop:
        model = stop.value
    held_out = [c for c in cases if c.case_id in set(model.provenance["validation_cases"])]
    dice = [native_dice(model, case.image, case.labels)["whole"] for case in held_out]  # one run, seed 0
    log("native whole Dice, one run: " + " ".join(f"{c.case_id}={x:.4f}" for c, x in zip(held_out, dice, strict=True)))
    log(f"native whole Dice, mean of {len(dice)} held-out cases: {float(np.mean(dice)):.4f}")


if __name__ == "__main__":
    main()
