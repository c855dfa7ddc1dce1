"""Fine-tuning measured as a user meets it: does the adapted model segment the slices nobody painted better?

For each validation case of a model (scans it never trained on) and each condition (the clean scan and the
MRI artefacts of ``mednca.artefacts``, the same corrupted scans the rest of the suite scores), the true
labels of N slices spread over the structure are given as the annotation, the model is fine-tuned with the
shared defaults (``mednca.finetuning.FINETUNE``), and both models segment the scan as ``mednca.segment`` does.
Reported, per case: whole-hippocampus Dice on the slices that were NOT annotated for the base model and the
adapted one; the engine's estimates of those two numbers; whether it recommended the adapted model; the
Dice of the model the user ends up with when following that advice; and the time the fine-tune took.

The method and its estimate were chosen on the first ``DEV_CASES`` validation cases (two rounds of six), and
the advice again on the same cases with the stage-6 default as base (``results/finetune_development.json``);
the benchmark runs on the others by default, which nothing was tuned on.

    python benchmarks/finetune.py [--cases N | --cases ID,ID] [--conditions none,motion] [--slices 4]
                                  [--threads 1] [--set lr=3e-4 --set iterations=40] [--json out.json]
    python benchmarks/finetune.py --summarize part1.json part2.json   # several runs' rows, one summary
    python benchmarks/finetune.py --summarize rows.json --current-advice  # earlier rows, today's advice

The advice is a function of the estimates each row stores (``mednca.finetuning.advise``), so a change of the
advice alone is measured on earlier rows with ``--current-advice``, without fine-tuning again.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from mednca.artefacts import CLEAN, scan_under
from mednca.finetuning import FINETUNE, advise, annotated_slices, finetune
from mednca.inference import segment, slice_axis, torch_threads
from mednca.registry import load_model
from mednca.volume import read_volume

CONDITIONS = (CLEAN, "ghosting", "bias_field", "motion", "spike", "inversion")
DEV_CASES = 12  # validation cases the method was chosen on; the benchmark defaults to the ones after them
GOOD = 0.85  # a base model at or above this Dice on a condition is "already good"


def spread(labels: np.ndarray, axis: int, n: int) -> list[int]:
    """N labelled slices evenly spread over the structure, leaving out its first and last slice."""
    fg = annotated_slices(labels, axis)
    return sorted({fg[int(i)] for i in np.linspace(0, len(fg) - 1, n + 2)[1:-1].round()})


def only(labels: np.ndarray, axis: int, slices: list[int]) -> np.ndarray:
    """``labels`` on the given slices along ``axis``, zero elsewhere: what the user annotated."""
    out = np.zeros_like(labels)
    index = [slice(None)] * 3
    index[axis] = slices
    out[tuple(index)] = labels[tuple(index)]
    return out


def unpainted_dice(model, scan, labels: np.ndarray, axis: int, painted: list[int]) -> float:
    """Whole-structure Dice of ``segment`` on the slices that were not painted (pooled over them)."""
    others = [s for s in range(labels.shape[axis]) if s not in painted]
    pred = np.take(segment(model, scan, seed=0).labels.array > 0, others, axis=axis)
    truth = np.take(labels > 0, others, axis=axis)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def run_case(model, data: Path, case: str, condition: str, n_slices: int, settings) -> dict:
    scan = read_volume(data / "imagesTr" / f"{case}.nii.gz")
    labels = np.asarray(read_volume(data / "labelsTr" / f"{case}.nii.gz").array).astype(np.uint8)
    scan = scan_under(scan, case, condition, seed=0)
    axis = slice_axis(model, scan)
    painted = spread(labels, axis, n_slices)
    wall, cpu = time.perf_counter(), time.process_time()
    tuned, report = finetune(model, scan, only(labels, axis, painted), settings=settings, base_name="benchmark")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    before = unpainted_dice(model, scan, labels, axis, painted)
    after = unpainted_dice(tuned, scan, labels, axis, painted)
    return {
        "case": case, "condition": condition, "slices": painted, "before": before, "after": after,
        "estimate_before": report.estimate_before, "estimate_after": report.estimate_after,
        "held_out": report.held_out_dice, "learned": report.learned_dice, "recommended": report.recommended,
        "advised": after if report.recommended else before,
        "painted_before": report.dice_before["whole"], "painted_after": report.dice_after["whole"],
        "seconds": wall, "cpu_seconds": cpu,
    }


COLUMNS = ("case", "condition", "base", "adapted", "change", "est.base", "est.adapt", "held-out", "rec", "advised",
           "change", "painted b/a", "s", "cpu s")
WIDTHS = (16, 10, 6, 7, 6, 8, 9, 8, 4, 7, 6, 11, 4, 5)


def line(cells) -> str:
    return " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True)))


def row_text(r: dict) -> str:
    return line([
        r["case"], r["condition"], f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['after'] - r['before']:+.3f}",
        f"{r['estimate_before']:.3f}", f"{r['estimate_after']:.3f}", f"{r['held_out']:.3f}",
        "yes" if r["recommended"] else "no", f"{r['advised']:.3f}", f"{r['advised'] - r['before']:+.3f}",
        f"{r['painted_before']:.3f}/{r['painted_after']:.3f}", f"{r['seconds']:.0f}", f"{r['cpu_seconds']:.0f}",
    ])


def mean_row(label: str, rows: list[dict]) -> str:
    keys = ("before", "after", "estimate_before", "estimate_after", "held_out", "advised", "seconds", "cpu_seconds")
    m = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return line([
        "mean", label, f"{m['before']:.3f}", f"{m['after']:.3f}", f"{m['after'] - m['before']:+.3f}",
        f"{m['estimate_before']:.3f}", f"{m['estimate_after']:.3f}", f"{m['held_out']:.3f}",
        f"{sum(r['recommended'] for r in rows)}/{len(rows)}", f"{m['advised']:.3f}",
        f"{m['advised'] - m['before']:+.3f}", "", f"{m['seconds']:.0f}", f"{m['cpu_seconds']:.0f}",
    ])


def change(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] - r["before"] for r in rows]))


def summary(rows: list[dict]) -> list[str]:
    """Means per condition; the issue's criteria on the model kept when following the advice (and on the
    adapted model whatever the advice); the estimate's error."""
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    by = {c: [r for r in rows if r["condition"] == c] for c in conditions}
    out = [mean_row(c, by[c]) for c in conditions] + [""]
    good = [c for c in conditions if np.mean([r["before"] for r in by[c]]) >= GOOD]
    for label, chosen in ((f">= {GOOD}", good), (f"< {GOOD}", [c for c in conditions if c not in good])):
        picked = [r for c in chosen for r in by[c]]
        if picked:
            worst = min(change(by[c], "advised") for c in chosen)
            out.append(f"conditions with mean base Dice {label} ({', '.join(chosen)}): change as advised "
                       f"{change(picked, 'advised'):+.3f} on average, worst condition {worst:+.3f} (adapted model: "
                       f"{change(picked, 'after'):+.3f})")
    for label, keep in ((f">= {GOOD}", lambda r: r["before"] >= GOOD), (f"< {GOOD}", lambda r: r["before"] < GOOD)):
        picked = [r for r in rows if keep(r)]
        if picked:
            out.append(f"cases with base Dice {label} ({len(picked)}): change as advised "
                       f"{change(picked, 'advised'):+.3f} on average (adapted model: {change(picked, 'after'):+.3f})")
    out.append(f"worst single case: {min(r['advised'] - r['before'] for r in rows):+.3f} as advised, "
               f"{min(r['after'] - r['before'] for r in rows):+.3f} adapted model; recommended "
               f"{sum(r['recommended'] for r in rows)} of {len(rows)}")
    for name, key, truth in (("base", "estimate_before", "before"), ("adapted", "estimate_after", "after"),
                             ("held-out alone, as an estimate for the adapted", "held_out", "after")):
        errors = np.array([r[key] - r[truth] for r in rows])
        out.append(f"estimate of unpainted Dice, {name}: mean |error| {np.abs(errors).mean():.3f}, mean error "
                   f"{errors.mean():+.3f}, largest |error| {np.abs(errors).max():.3f}")
    seconds = [r["seconds"] for r in rows]
    out.append(f"seconds per fine-tune (wall, this run's threads): mean {np.mean(seconds):.0f}, max {max(seconds):.0f}")
    return out


def readvised(row: dict) -> dict:
    """``row`` with its recommendation and the model kept as the current ``FINETUNE`` advice decides. Rows
    written before ``learned`` (the adapted model's Dice on the painted slices pooled over runs) was stored
    give its single-run value instead, ``painted_after``: in every such row whose base scored below
    ``poor_base`` it led the base by 0.066 or more, so the advice is the same on either basis."""
    learned = row.get("learned", row["painted_after"])
    recommended, _ = advise(row["estimate_before"], row["estimate_after"], row["held_out"], learned)
    return {**row, "recommended": recommended, "advised": row["after"] if recommended else row["before"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/hippocampus")
    parser.add_argument("--cases", default="all",
                        help="'all' validation cases after the development ones, how many of them, or ids")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--slices", type=int, default=4, help="annotated slices per scan")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a fine-tuning setting (a FinetuneSettings field; a Python literal)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only print the rows and summary of earlier runs' --json files, together")
    parser.add_argument("--current-advice", action="store_true",
                        help="with --summarize: advise on the stored rows' estimates as the engine now does")
    args = parser.parse_args()

    if args.summarize:
        rows = [row for path in args.summarize for row in json.loads(path.read_text())]
        if args.current_advice:
            rows = list(map(readvised, rows))
            print(f"advice as the engine now gives it: {asdict(FINETUNE)}")
        print(line(COLUMNS))
        print("\n".join([*map(row_text, rows), "", *summary(rows)]))
        return
    model = load_model(args.model)
    validation = model.provenance["validation_cases"]
    if args.cases == "all" or args.cases.isdigit():
        cases = validation[DEV_CASES:][: None if args.cases == "all" else int(args.cases)]
    else:
        cases = args.cases.split(",")
    settings = replace(FINETUNE, **{k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)})
    print(f"model {args.model}; validation cases {', '.join(cases)}; {args.slices} annotated slices per scan; "
          f"settings {asdict(settings)}; torch threads {args.threads}. Whole-hippocampus Dice on the slices NOT "
          "annotated: base and adapted model, the engine's estimates of both, the cross-validated Dice on the "
          "held-out annotated slices, its recommendation, the model kept when following it; Dice on the "
          "annotated slices (which the adapted model trained on); seconds (wall and CPU) of the fine-tune")
    print(line(COLUMNS))
    rows = []
    with torch_threads(args.threads):
        for case in cases:
            for condition in args.conditions.split(","):
                rows.append(run_case(model, args.data, case, condition, args.slices, settings))
                print(row_text(rows[-1]), flush=True)
                if args.json is not None:
                    args.json.write_text(json.dumps(rows, indent=1))
    print("\n".join(["", *summary(rows)]))


if __name__ == "__main__":
    main()
