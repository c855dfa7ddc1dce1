"""Half of the quality map's runs from a second model: does averaging two models' probabilities beat one model?

    python benchmarks/ensemble.py [--partners hippocampus_msd FILE ...] [--threads 1] [--shared ../shared]

For each of the default model's 21 held-out cases, at the cost of one 10-run map: the default's 5 runs (seed 0)
averaged with 5 runs of each partner (seed 100), against the default's own 10 runs (seeds 0 and 100), labelled by
the engine's rule (``labels_from_probabilities``) and scored as whole-structure Dice at native resolution.
Printed per case and as paired differences (mean +- standard error, cases better); written to
benchmarks/results/ensemble.txt. The partners must have the default's classes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from mednca.data import data_pairs
from mednca.evaluation import case_dice, select_cases
from mednca.inference import labels_from_probabilities, quality_map
from mednca.registry import DEFAULT_MODEL, load_model
from mednca.volume import check_labels, read_volume

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partners", nargs="+", default=["hippocampus_msd"], help="model names or files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    default = load_model(DEFAULT_MODEL)
    partners = {name: load_model(name) for name in args.partners}
    names = default.config.class_names
    pairs = select_cases(default, data_pairs(args.shared / "data" / "hippocampus"), "validation")
    lines = [f"{DEFAULT_MODEL} 5 runs (seed 0) + each partner's 5 (seed 100) against {DEFAULT_MODEL}'s 10 "
             f"(seeds 0, 100); whole Dice, {len(pairs)} held-out cases, native resolution",
             "case: alone | " + " | ".join(partners)]
    table = []
    for case, image_path, label_path in pairs:
        volume = read_volume(image_path)
        truth = check_labels(read_volume(label_path), volume)
        first = quality_map(default, volume, runs=5, seed=0, threads=args.threads).mean
        second = [quality_map(m, volume, runs=5, seed=100, threads=args.threads).mean
                  for m in (default, *partners.values())]
        table.append([case_dice(labels_from_probabilities((first + other) / 2), truth, names)[0] for other in second])
        lines.append(f"{case}: " + " | ".join(f"{x:.4f}" for x in table[-1]))
        print(lines[-1], flush=True)
    t = np.array(table)
    lines.append("mean: " + " | ".join(f"{x:.4f}" for x in t.mean(0)))
    for i, name in enumerate(partners, start=1):
        d = t[:, i] - t[:, 0]
        lines.append(f"with {name} - alone: {d.mean():+.4f} +- {d.std(ddof=1) / math.sqrt(len(d)):.4f}, "
                     f"better on {int((d > 0).sum())} of {len(d)}")
    print("\n".join(lines[-len(partners) - 1:]))
    (RESULTS / "ensemble.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
