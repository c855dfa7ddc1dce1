"""How a two-class model's probabilities become labels: the engine's rule beside two others.

    python benchmarks/labelling_rules.py [--model hippocampus] [--runs 10] [--threads 1] [--shared ../shared]

Each rule labels a voxel with its most probable class, where

- engine (``mednca.inference.labels_from_probabilities``): the class probabilities add up to more than 0.5
  (the classes are parts of one structure and exclude each other);
- part: that class's own probability exceeds 0.5, the engine's rule until 2026-11-24. Where anterior and
  posterior meet, a voxel can be 0.45 one and 0.45 the other: surely hippocampus, yet labelled background;
- union: 1 - prod(1 - p) > 0.5, the structure's probability as the training loss's whole-structure term has it.

Each rule labels the mean of the same ``--runs``-run quality map of the model's 21 held-out cases at native
resolution. Printed: whole, anterior and posterior Dice per case and on average, and each rule's paired
difference to the engine's (mean +- standard error, cases better). Written to
benchmarks/results/labelling_rules.txt.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from mednca.checkpoint import weights_digest
from mednca.data import data_pairs
from mednca.evaluation import case_dice, select_cases
from mednca.inference import labels_from_probabilities, quality_map
from mednca.registry import load_model
from mednca.volume import check_labels, read_volume

REPO = Path(__file__).resolve().parents[1]


def rule_labels(prob: np.ndarray) -> dict[str, np.ndarray]:
    """``[K, ...]`` mean probabilities -> labels under each rule, the engine's first."""
    best = (prob.argmax(0) + 1).astype(np.uint8)
    return {
        "engine": labels_from_probabilities(prob),
        "part": np.where(prob.max(0) > 0.5, best, 0),
        "union": np.where(1 - np.prod(1 - prob, 0) > 0.5, best, 0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    if model.config.output_channels != 2:
        sys.exit(f"{args.model} has {model.config.output_channels} classes; the rules differ only for two")
    pairs = select_cases(model, data_pairs(args.shared / "data" / "hippocampus"), "validation")
    digest = weights_digest(model.state_dict())[:16]
    lines = [f"{args.model} (weights {digest}): {args.runs}-run quality maps of {len(pairs)} held-out cases, "
             "native resolution",
             "case: whole anterior posterior Dice under engine | part | union"]
    table = []  # [case, rule, measure]
    for case, image_path, label_path in pairs:
        volume = read_volume(image_path)
        truth = check_labels(read_volume(label_path), volume)
        mean = quality_map(model, volume, runs=args.runs, threads=args.threads).mean
        dice = [case_dice(labels, truth, model.config.class_names) for labels in rule_labels(mean).values()]
        table.append([[whole, *per_class.values()] for whole, per_class in dice])
        lines.append(f"{case}: " + " | ".join(" ".join(f"{x:.4f}" for x in row) for row in table[-1]))
        print(lines[-1], flush=True)
    t = np.array(table)
    lines.append("mean: " + " | ".join(" ".join(f"{x:.4f}" for x in row) for row in t.mean(0)))
    for r, rule in enumerate(("part", "union"), start=1):
        for m, measure in enumerate(("whole", "anterior", "posterior")):
            d = t[:, r, m] - t[:, 0, m]
            lines.append(f"{rule} - engine, {measure}: {d.mean():+.4f} +- {d.std(ddof=1) / math.sqrt(len(d)):.4f}, "
                         f"better on {int((d > 0).sum())} of {len(d)}")
    print("\n".join(lines[-6:]))
    (REPO / "benchmarks" / "results" / "labelling_rules.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
