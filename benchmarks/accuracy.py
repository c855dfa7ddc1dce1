"""Accuracy of the shipped hippocampus models beside the Med-NCA authors' model, on cases ours never saw.

    python benchmarks/accuracy.py [--models hippocampus hippocampus_msd] [--limit K] [--quality 10]
                                  [--training-cases K] [--shared ../shared] [--threads 1]

All models segment our models' validation cases (recorded in their provenance) at native resolution
with a quality map of ``--quality`` stochastic runs; the report gives whole-hippocampus Dice, Dice per class
(ours separate anterior and posterior; the authors' model has one class), NQM, and how well NQM
flags the bad cases (its correlation with Dice: negative is useful). Written to benchmarks/results/accuracy.txt,
with the per-case reports as JSON beside it.

Caveat printed with the numbers: the authors trained on their own random 70% of MSD Task04, so some of these
cases were probably in their training set, which favours their model. Until a model of ours exists, the
validation cases are those its training script holds out (val_fraction 0.1, seed 0 over dataset.json's order).

``--training-cases K`` also scores K cases our models trained on (drawn with seed 0), to tell how much of a lead
is fit and how much is seeing the case: a model's Dice on cases it trained on against cases it did not, and,
per validation case, whether the authors' model leads ours (by more than ``LEAD``) or not. The authors' split is
not published; if their model had trained on about 70% of our validation cases, it would lead on about that
share of them, by about our own models' gap between trained-on and held-out cases.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mednca.checkpoint import import_reference
from mednca.data import data_pairs, split_cases
from mednca.errors import CheckpointError
from mednca.evaluation import EvaluationReport, evaluate_iter
from mednca.registry import load_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LEAD = 0.005  # whole Dice by which a model "leads" another on a case (runs of one model differ by about 0.002)
AUTHORS = "authors (Med-NCA)"


def run(name: str, model, data: Path, cases: list[str], quality: int, threads: int) -> EvaluationReport:
    """Evaluate with a one-line progress counter on stderr."""
    gen = evaluate_iter(model, data, quality_runs=quality, cases=cases, threads=threads)
    start, shown = time.perf_counter(), None
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            print(file=sys.stderr)
            return stop.value
        if (p.done, p.stage) == shown:
            continue
        shown = (p.done, p.stage)
        print(f"\r{name}: {p.done}/{p.total} cases ({p.stage}) {time.perf_counter() - start:.0f} s",
              end="", file=sys.stderr, flush=True)


def summary_lines(reports: dict[str, EvaluationReport]) -> list[str]:
    """Metric rows with one column per model."""
    names = list(reports)
    classes = sorted({c for r in reports.values() for c in r.columns if c.startswith("dice_") and c != "dice_whole"})

    def stat(report: EvaluationReport, column: str) -> str:
        if column not in report.columns:
            return "n/a"
        v = report.values(column)
        return f"{v.mean():.4f} ± {v.std():.4f}  (median {np.median(v):.4f}, min {v.min():.4f})"

    rows = [["metric", *names]]
    for column in ["dice_whole", *classes, "nqm"]:
        rows.append([column, *(stat(reports[n], column) for n in names)])
    for key in ("pearson", "spearman"):
        values = (reports[n].correlation()[key] for n in names)
        rows.append([f"{key}(NQM, Dice)", *(f"{v:+.3f}" if np.isfinite(v) else "n/a (< 3 cases)" for v in values)])
    rows.append(["cases", *(str(len(reports[n].rows)) for n in names)])
    rows.append(["seconds / case", *(f"{reports[n].values('seconds').mean():.1f}" for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def per_case_lines(reports: dict[str, EvaluationReport]) -> list[str]:
    """Whole Dice and NQM of every case, the models side by side."""
    names = list(reports)
    by_case = {n: {row.case: row for row in r.rows} for n, r in reports.items()}
    head = "case             " + "".join(f"{n[:22]:>24}{'NQM':>9}" for n in names)
    lines = [head]
    for case in (row.case for row in reports[names[0]].rows):
        cells = "".join(f"{by_case[n][case].dice_whole:>24.4f}{by_case[n][case].nqm or float('nan'):>9.4f}"
                        for n in names)
        lines.append(f"{case:<17}{cells}")
    return lines


def training_sample(data: Path, held_out: list[str], k: int) -> list[str]:
    """``k`` cases of the data outside ``held_out`` (the cases our models trained on), drawn with seed 0."""
    held = set(held_out)
    ids = [case for case, _, _ in data_pairs(data) if case not in held]
    pick = np.random.default_rng(0).choice(len(ids), min(k, len(ids)), replace=False)
    return [ids[i] for i in sorted(pick)]


def fit_lines(held_out: dict[str, EvaluationReport], trained: dict[str, EvaluationReport]) -> list[str]:
    """Whole Dice on cases our models trained on against the held-out ones, and where the authors' model leads."""
    lines = [f"{'model':<24}{'trained-on cases':>18}{'held-out cases':>16}{'gap':>8}   authors lead on held-out cases"]
    authors = {row.case: row.dice_whole for row in held_out[AUTHORS].rows}
    for name, report in held_out.items():
        fit, test = trained[name].values("dice_whole").mean(), report.values("dice_whole").mean()
        lead = ""
        if name != AUTHORS:
            diffs = np.array([authors[row.case] - row.dice_whole for row in report.rows])
            ahead = diffs > LEAD
            lead = (f"by > {LEAD} on {ahead.sum()} of {len(diffs)} (mean {diffs[ahead].mean():+.4f}), "
                    f"within {LEAD} or behind on {len(diffs) - ahead.sum()} (mean {diffs[~ahead].mean():+.4f})"
                    if 0 < ahead.sum() < len(diffs) else f"mean {diffs.mean():+.4f}")
        lines.append(f"{name[:23]:<24}{fit:>18.4f}{test:>16.4f}{fit - test:>+8.4f}   {lead}".rstrip())
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--limit", type=int, default=None, help="only the first K validation cases")
    parser.add_argument("--quality", type=int, default=10, help="stochastic runs per case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--training-cases", type=int, default=0, metavar="K",
                        help="also score K cases our models trained on (seed 0), for the fit/held-out comparison")
    parser.add_argument("--models", nargs="+", default=["hippocampus", "hippocampus_msd"],
                        help="shipped or user models to compare with the authors' (they share validation cases)")
    args = parser.parse_args(argv)
    data = args.shared / "data" / "hippocampus"
    authors = import_reference(args.shared / "reference" / "mednca_hippocampus")
    ours = {}
    for name in args.models:
        try:
            ours[name] = load_model(name)
        except CheckpointError as e:
            print(f"{name}: not evaluated ({e})", file=sys.stderr)
    if ours:
        recorded = {tuple(m.provenance["validation_cases"]) for m in ours.values()}
        if len(recorded) > 1:
            raise SystemExit("the models were validated on different cases; compare them one at a time")
        cases, origin = list(recorded.pop()), "recorded in the models"
    else:
        ids = [case for case, _, _ in data_pairs(data)]
        cases = [ids[i] for i in split_cases(len(ids), 0.1, 0)[1]]
        origin = "held out by benchmarks/train_hippocampus.py (no model of ours built yet)"
    cases = cases[: args.limit]

    models = {**{f"{name} (mednca)": m for name, m in ours.items()}, AUTHORS: authors}
    reports = {name: run(name, model, data, cases, args.quality, args.threads) for name, model in models.items()}
    fit = []
    if args.training_cases and ours:
        sample = training_sample(data, cases, args.training_cases)
        trained = {name: run(f"{name}, trained-on cases", model, data, sample, args.quality, args.threads)
                   for name, model in models.items()}
        fit = ["", f"Fit against held-out: whole Dice on {len(sample)} cases our models trained on (a seed-0 sample",
               "of the data outside the validation cases; the authors' model saw an unknown 70% of the data) and",
               "on the validation cases above:", "", *fit_lines(reports, trained), "", *per_case_lines(trained)]

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads available, torch {torch.__version__}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Accuracy on {len(cases)} hippocampus validation cases ({origin}),",
        f"native resolution, {args.quality}-run quality maps, seed 0, {args.threads} thread(s) used;",
        f"{machine}; commit {commit.stdout.strip() or '?'}; {when}",
        "Dice = 2|P∩L| / (|P|+|L|) per case at the scan's own resolution; mean ± std (population) over cases.",
        "Labels from the mean probability of the runs (classes summed > 0.5).",
        "Negative NQM/Dice correlation: NQM flags bad cases.",
        "",
        *summary_lines(reports),
        "",
        *per_case_lines(reports),
        "",
        "Caveat: the authors trained on their own random 70% of MSD Task04; some of these cases were probably",
        "in their training set, which favours their model in this comparison.",
        *fit,
    ]
    for name, model in ours.items():
        prov = model.provenance
        lines.append(f"{name}: {prov.get('iterations')} iterations, {prov.get('train_seconds')} s of training.")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.txt").write_text(text)
    for name, report in reports.items():
        report.to_json(RESULTS / f"accuracy_{name.split()[0]}.json")


if __name__ == "__main__":
    main()
