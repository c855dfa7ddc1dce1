"""Training speed and early convergence: our recipe against the Med-NCA authors' plain recipe.

1. Iterations per second of both recipes, measured alternately in one process (one thread), so that
   load from other processes hits both alike.
2. Validation Dice (model space, whole hippocampus) after the same short run of each recipe, same seed,
   same data, same batch size.
3. From training logs of ``benchmarks/train_hippocampus.py``: training time until the validation Dice
   first reached each target. Several logs are stages of one model (the second started from the first's
   result), so their times and iterations add up. Only this part runs when SHORT_ITERATIONS is 0.

    python benchmarks/training.py DATA_DIR [SHORT_ITERATIONS] [TRAINING_LOG ...]
"""

from __future__ import annotations

import re
import sys
import time

import torch

from mednca.data import build_slices, load_cases, split_cases
from mednca.preprocess import Preprocessing
from mednca.training import AUTHORS_RECIPE, HIPPOCAMPUS, Recipe, _train_step, new_model, train_iter

RECIPES = {"ours": Recipe(), "authors'": AUTHORS_RECIPE}
TARGETS = (0.8, 0.85, 0.875, 0.89)  # 0.89: the Med-NCA paper's hippocampus Dice, rounded up


def speed(train, batch_size: int, rounds: int = 3, steps: int = 10) -> dict[str, float]:
    models = {name: new_model(HIPPOCAMPUS, Preprocessing(), 0) for name in RECIPES}
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    gens = {name: torch.Generator().manual_seed(0) for name in RECIPES}
    spent = dict.fromkeys(RECIPES, 0.0)
    for _ in range(rounds):
        for name, recipe in RECIPES.items():
            t = time.perf_counter()
            for _ in range(steps):
                _train_step(models[name], opts[name], train, batch_size, recipe, gens[name])
            spent[name] += time.perf_counter() - t
    return {name: rounds * steps / s for name, s in spent.items()}


def short_runs(slices, iterations: int, batch_size: int) -> dict[str, dict]:
    out = {}
    for name, recipe in RECIPES.items():
        t = time.perf_counter()
        events = list(train_iter(slices, recipe=recipe, iterations=iterations, batch_size=batch_size,
                                 eval_every=iterations, eval_slices=256, seed=0))
        dice = [e.val_dice for e in events if e.kind == "eval"][-1]
        out[name] = {"dice": dice, "seconds": time.perf_counter() - t}
    return out


def time_to_target(log_paths: list[str], target: float) -> str:
    """Training time (the seconds the logs' step lines carry, restarts excluded, stages added up) until the
    validation Dice first reached ``target``."""
    seconds = iterations = 0
    for stage, log_path in enumerate(log_paths, 1):
        offset_s, offset_it = seconds, iterations
        for line in open(log_path):
            step = re.search(r" it (\d+)/\d+ loss [0-9.]+ (\d+)s", line)
            if step:
                iterations, seconds = offset_it + int(step[1]), offset_s + int(step[2])
            hit = re.search(r" it (\d+) validation Dice .* whole ([0-9.]+)", line)
            if hit and float(hit[2]) >= target:
                return (f"whole Dice {float(hit[2]):.4f} >= {target} at iteration {offset_it + int(hit[1])} "
                        f"(stage {stage}), after {seconds / 60:.0f} min")
    return f"whole Dice never reached {target} (in {iterations} iterations, {seconds / 60:.0f} min)"


def main(data: str, iterations: int = 300, *log_paths: str) -> None:
    torch.set_num_threads(1)
    if iterations == 0:
        return report_log(log_paths)
    slices = build_slices(load_cases(data), HIPPOCAMPUS, Preprocessing())
    train_cases, _ = split_cases(len(slices.case_ids), 0.1, 0)
    train = slices.subset(train_cases)
    print("training iterations per second, one thread, alternating recipes in one process")
    print(f"{'batch':>5s} " + " ".join(f"{n:>10s}" for n in RECIPES) + "   ratio")
    for bs in (8, 16):
        s = speed(train, bs)
        ours, theirs = s["ours"], s["authors'"]
        print(f"{bs:5d} " + " ".join(f"{v:10.2f}" for v in s.values()) + f"   {ours / theirs:5.2f}")
    print(f"\nvalidation Dice (64x64, 256 validation slices) after {iterations} iterations, batch 8, seed 0")
    for name, r in short_runs(slices, iterations, 8).items():
        d = r["dice"]
        print(f"{name:10s} whole {d['whole']:.3f} anterior {d['anterior']:.3f} posterior {d['posterior']:.3f}"
              f"   ({r['seconds']:.0f} s)")
    if log_paths:
        report_log(log_paths)


def report_log(log_paths: list[str]) -> None:
    print(f"\ntraining time to a validation Dice (64x64 probe of validation slices) in {', '.join(log_paths)}:")
    for target in TARGETS:
        print(f"  {time_to_target(log_paths, target)}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]), *sys.argv[3:])
