"""Judge a candidate model against the shipped default by the adoption rule, on the robustness suite's rows.

    python benchmarks/adoption.py CANDIDATE.csv [--default benchmarks/results/robustness_hippocampus.csv]
                                  [--authors benchmarks/results/robustness_authors.csv]

Each CSV holds rows of benchmarks/robustness.py (10-run quality maps of the 21 held-out cases, clean and under every
artefact). Cases are paired: for every condition the table gives the mean whole-hippocampus Dice of the candidate,
the default and the authors' model, the candidate's mean paired difference to the default with its standard error
(std / sqrt(n)) and how many cases it improves. The rule, fixed in docs/training_history.md before each training
stage starts, is that a candidate replaces the default only if

1. its clean whole Dice is higher than the default's on average,
2. under no artefact is it below the default by more than two standard errors,
3. under every artefact its mean is at least the authors' model's.

``--price CAP`` judges by the trade-off rule instead, for a stage that gives up some robustness for clean accuracy
(stage 13, lighter augmentation): the clean gain must be beyond two standard errors (a trade has to buy something
real), no artefact's mean may fall below the default's by more than CAP, and condition 3 stands.

A candidate missing any map the default was judged on (an interrupted robustness run) is not adopted: the rule is
over all the cases, and the first nine of them look better than the rest.

Why paired: the cases differ far more from each other than the models do, so only paired differences resolve the
thousandths that separate one training stage from the next.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from robustness import paired  # benchmarks/robustness.py, beside this script: its paired differences

from mednca.artefacts import CLEAN

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(path: Path) -> list[dict]:
    """The 10-run rows of a robustness CSV (single runs are a different statistic)."""
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["runs"] == "10"]


def whole_dice(rows: list[dict]) -> dict[tuple[str, str], float]:
    """Whole Dice by (case, condition), the key ``robustness.paired`` uses."""
    return {(r["case"], r["artefact"]): float(r["dice_whole"]) for r in rows}


def compare(candidate: list[dict], default: list[dict], authors: list[dict]) -> list[dict]:
    """One row per condition over the cases all three models have: the means, and the candidate's paired
    difference to the default with its SE and the cases it improves (``robustness.paired``)."""
    dice = [whole_dice(rows) for rows in (candidate, default, authors)]
    common = set.intersection(*(set(d) for d in dice))
    rows = []
    for condition, diff in sorted(paired(candidate, default, common).items(), key=lambda c: (c[0] != CLEAN, c[0])):
        keys = [key for key in common if key[1] == condition]
        means = [sum(d[key] for key in keys) / len(keys) for d in dice]
        rows.append({
            "condition": condition, "cases": diff["cases"], "candidate": means[0], "default": means[1],
            "authors": means[2], "diff": diff["diff_mean"], "better": diff["better"],
            "se": math.inf if diff["diff_se"] is None else diff["diff_se"],
        })
    return rows


def verdict(rows: list[dict], missing: list[tuple[str, str]], price: float | None = None) -> list[tuple[str, bool]]:
    """The rule's conditions, each with whether the candidate meets it. ``missing`` are the (case, condition)
    maps the default was judged on that the candidate lacks: the rule is over all of them, so a partial run
    decides nothing. ``price``: the trade-off rule's cap on an artefact's mean loss (module docstring)."""
    clean = [r for r in rows if r["condition"] == CLEAN]
    artefacts = [r for r in rows if r["condition"] != CLEAN]
    if price is None:
        checks = [
            ("clean whole Dice higher than the default's", bool(clean) and clean[0]["diff"] > 0),
            ("no artefact below the default by more than 2 SE",
             bool(artefacts) and all(r["diff"] >= -2 * r["se"] for r in artefacts)),
        ]
    else:
        checks = [
            ("clean whole Dice higher than the default's by more than 2 SE",
             bool(clean) and clean[0]["diff"] > 2 * clean[0]["se"]),
            (f"no artefact's mean below the default's by more than {price}",
             bool(artefacts) and all(r["diff"] >= -price for r in artefacts)),
        ]
    checks += [
        ("every artefact at least the authors'",
         bool(artefacts) and all(r["candidate"] >= r["authors"] for r in artefacts)),
    ]
    if missing:
        checks.append((f"the candidate has every map the default has ({len(missing)} missing, e.g. "
                       f"{missing[0][0]} {missing[0][1]})", False))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--default", type=Path, default=RESULTS / "robustness_hippocampus.csv")
    parser.add_argument("--authors", type=Path, default=RESULTS / "robustness_authors.csv")
    parser.add_argument("--price", type=float, metavar="CAP",
                        help="judge by the trade-off rule: artefact losses up to CAP for a clean gain beyond 2 SE")
    args = parser.parse_args(argv)
    candidate, default, authors = (read_rows(path) for path in (args.candidate, args.default, args.authors))
    rows = compare(candidate, default, authors)
    print(f"{'condition':11s} {'n':>3s} {'candidate':>9s} {'default':>8s} {'authors':>8s} "
          f"{'cand - default':>17s} {'better':>6s}")
    for r in rows:
        print(f"{r['condition']:11s} {r['cases']:3d} {r['candidate']:9.4f} {r['default']:8.4f} {r['authors']:8.4f} "
              f"{r['diff']:+8.4f} +- {r['se']:.4f} {r['better']:4d}/{r['cases']}")
    checks = verdict(rows, sorted(set(whole_dice(default)) - set(whole_dice(candidate))), args.price)
    for text, met in checks:
        print(f"{'met ' if met else 'FAILED'}  {text}")
    adopt = all(met for _, met in checks)
    print("adopt: the candidate replaces the default" if adopt else "keep the default")
    return 0 if adopt else 1


if __name__ == "__main__":
    sys.exit(main())
