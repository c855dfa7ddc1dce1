"""Is 0.5 the right cut on the structure's probability? Fitted on cases the model trained on, checked on held-out ones.

    python benchmarks/label_threshold.py [--model hippocampus] [--training-cases 21] [--runs 10] [--threads 1]
                                         [--shared ../shared]

The engine labels the most probable class where the class probabilities add up to more than 0.5
(``mednca.inference.labels_from_probabilities``). A model trained on Dice need not be calibrated so that 0.5 is
its best cut: the default's labels come out about 1% larger than the truth on held-out scans, the authors' model's
level with it. This sweeps the cut over the mean of ``--runs``-run quality maps at native resolution:

- fitted on ``--training-cases`` cases the model trained on (``accuracy.training_sample``, seed 0), so the held-out
  cases choose nothing;
- applied to the 21 held-out cases: whole Dice at the fitted cut against 0.5, paired (mean +- standard error,
  cases better), and the held-out cases' own best cut for comparison (which would be fitted on the test).

Written to benchmarks/results/label_threshold.txt.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from accuracy import training_sample  # benchmarks/accuracy.py, beside this script

from mednca.checkpoint import weights_digest
from mednca.data import data_pairs
from mednca.evaluation import case_dice, select_cases
from mednca.inference import labels_from_probabilities, quality_map
from mednca.registry import load_model
from mednca.volume import check_labels, read_volume

REPO = Path(__file__).resolve().parents[1]
CUTS = (0.35, 0.4, 0.45, 0.475, 0.5, 0.525, 0.55, 0.575, 0.6, 0.65)


def sweep(model, pairs: list, runs: int, threads: int) -> np.ndarray:
    """Whole Dice ``[case, cut]`` over ``CUTS``."""
    table = []
    names = model.config.class_names
    for case, image_path, label_path in pairs:
        volume = read_volume(image_path)
        truth = check_labels(read_volume(label_path), volume)
        mean = quality_map(model, volume, runs=runs, threads=threads).mean
        table.append([case_dice(labels_from_probabilities(mean, cut), truth, names)[0] for cut in CUTS])
        print(f"{case}: " + " ".join(f"{d:.4f}" for d in table[-1]), flush=True)
    return np.array(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--training-cases", type=int, default=21)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    data = args.shared / "data" / "hippocampus"
    pairs = data_pairs(data)
    held_out = select_cases(model, pairs, "validation")
    trained = select_cases(model, pairs, training_sample(data, [c for c, _, _ in held_out], args.training_cases))
    fit, test = sweep(model, trained, args.runs, args.threads), sweep(model, held_out, args.runs, args.threads)
    base = CUTS.index(0.5)
    chosen = int(fit.mean(0).argmax())
    diff = test[:, chosen] - test[:, base]
    digest = weights_digest(model.state_dict())[:16]
    lines = [
        f"{args.model} (weights {digest}): whole Dice of {args.runs}-run quality maps at native resolution, labels "
        "where the class probabilities add up to more than the cut",
        "cut:                " + " ".join(f"{c:>6}" for c in CUTS),
        f"{len(trained)} trained-on cases: " + " ".join(f"{d:.4f}" for d in fit.mean(0)),
        f"{len(held_out)} held-out cases:   " + " ".join(f"{d:.4f}" for d in test.mean(0)),
        f"fitted on the trained-on cases: cut {CUTS[chosen]}",
        f"held-out, cut {CUTS[chosen]} - cut 0.5: {diff.mean():+.4f} +- {diff.std(ddof=1) / math.sqrt(len(diff)):.4f}, "
        f"better on {int((diff > 0).sum())} of {len(diff)}",
        f"held-out cases' own best cut (fitted on the test, for comparison): {CUTS[int(test.mean(0).argmax())]}",
    ]
    print("\n".join(lines))
    (REPO / "benchmarks" / "results" / "label_threshold.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
