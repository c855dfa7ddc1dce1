"""Calibrate a model's quality verdict on its held-out cases, clean and under artefacts, and report its power.

    python benchmarks/calibrate_quality.py [--model hippocampus] [--fit-on ID,ID,...] [--write]

Reads benchmarks/results/robustness_<model>.csv (benchmarks/robustness.py: 10-run quality maps of the model's
validation cases, clean and under every artefact of mednca.artefacts) and chooses the verdict's limits
(mednca.quality.QualityCriteria) by a grid search over the features the engine judges by (NQM, the runs'
relative spread of the whole volume, the share of scattered labels):

- every case with Dice < 0.5 must get "fail";
- at most 10% of clean cases with Dice >= 0.85 may get anything but "ok";
- among the limits meeting both, the ones giving the most cases with Dice < 0.8 a non-ok verdict, then the
  fewest non-ok verdicts for cases with Dice >= 0.85 (any condition), then the fewest "fail" verdicts for
  cases with Dice >= 0.5 ("likely failed" is kept for failures), then the largest limits.

The per-slice limit is the smallest of a grid for which the median number of slices worth checking on clean
scans is at most 2. Printed: the limits, detection power (sensitivity for failed and poor cases, false alarms
on clean good ones, AUROC of NQM for Dice < 0.8), the per-slice figures (median flagged slices on clean scans,
Spearman of slice score against slice Dice on poor scans), and the volume error per class on clean scans (the
true volumes from the label files in ``--shared``).
``--fit-on`` chooses the limits on those cases only and also reports their power on the other cases, which
nothing was chosen on: the honest figure for scans the calibration never saw.
``--write`` stores the limits, with where they come from, in the shipped model file (a new checksum; weights
untouched). Results go to benchmarks/results/quality_calibration_<model>.txt (with a per-condition table of
Dice, NQM and verdicts) and .json.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from mednca.checkpoint import save_model
from mednca.evaluation import spearman
from mednca.quality import QualityCriteria, judge, slice_scores
from mednca.registry import SHIPPED_DIR, load_model

REPO = Path(__file__).resolve().parents[1]
FAILED, POOR, GOOD = 0.5, 0.8, 0.85
MAX_FALSE_ALARMS = 0.10


def load_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("run_volumes_ml")]
    for r in rows:
        r["dice"] = float(r["dice_whole"])
        r["nqm_f"] = float(r["nqm"])
        r["scattered_f"] = float(r["scattered"])
        r["runs_ml"] = np.array(json.loads(r["run_volumes_ml"]), float)
        r["labelled"] = int(r["pred_voxels"])
        for key in ("slice_std", "slice_mass", "slice_dice", "slice_errors"):
            r[key + "_a"] = np.array([np.nan if v is None else v for v in json.loads(r[key])], float)
    return rows


def verdicts(rows: list[dict], c: QualityCriteria) -> list[str]:
    return [judge(r["nqm_f"], r["runs_ml"], r["scattered_f"], r["labelled"], c).level for r in rows]


def power(rows: list[dict], levels: list[str]) -> dict:
    dice = np.array([r["dice"] for r in rows])
    clean = np.array([r["artefact"] == "none" for r in rows])
    lv = np.array(levels)
    failed, poor, good = dice < FAILED, dice < POOR, dice >= GOOD

    def share(mask, hit):
        return (float(hit[mask].mean()), int(mask.sum())) if mask.any() else (float("nan"), 0)

    return {
        "failed_get_fail": share(failed, lv == "fail"),
        "poor_get_not_ok": share(poor, lv != "ok"),
        "clean_good_false_alarms": share(clean & good, lv != "ok"),
        "good_false_alarms_any_condition": share(good, lv != "ok"),
        "counts": {v: int((lv == v).sum()) for v in ("ok", "check", "fail")},
    }


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive case scores higher than a negative one (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def levels_fast(features: np.ndarray, nc, nf, cc, cf, sc) -> np.ndarray:
    """``judge``'s levels for many rows at once (0 ok, 1 check, 2 fail); ``features`` [rows, 4]: NQM, the
    runs' volume CV, scattered share, labelled voxels. ``search`` checks its choice against ``judge``."""
    nqm, cv, scatter, labelled = features.T
    level = np.zeros(len(features), int)
    level = np.maximum(level, np.where(nqm > nf, 2, np.where(nqm > nc, 1, 0)))
    level = np.maximum(level, np.where(cv > cf, 2, np.where(cv > cc, 1, 0)))
    level = np.maximum(level, np.where(scatter > sc, 1, 0))
    return np.where(labelled == 0, 2, level)


def search(rows: list[dict]) -> QualityCriteria:
    grid_nqm = np.round(np.arange(0.06, 0.60, 0.01), 3)
    grid_cv = [0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 1.0]
    grid_scatter = [0.1, 0.15, 0.2, 0.3, 0.5, 0.99]
    features = np.array([[r["nqm_f"], r["runs_ml"].std() / r["runs_ml"].mean() if r["runs_ml"].mean() > 0 else 0.0,
                          r["scattered_f"], r["labelled"]] for r in rows])
    dice = np.array([r["dice"] for r in rows])
    clean_good = np.array([r["artefact"] == "none" for r in rows]) & (dice >= GOOD)
    failed, poor, good = dice < FAILED, dice < POOR, dice >= GOOD
    best, best_key = None, None
    for nc, nf in itertools.combinations_with_replacement(grid_nqm, 2):
        for cc, cf in itertools.combinations_with_replacement(grid_cv, 2):
            for sc in grid_scatter:
                lv = levels_fast(features, nc, nf, cc, cf, sc)
                if failed.any() and not (lv[failed] == 2).all():
                    continue
                if clean_good.any() and (lv[clean_good] > 0).mean() > MAX_FALSE_ALARMS:
                    continue
                sensitivity = (lv[poor] > 0).mean() if poor.any() else 1.0
                alarms = (lv[good] > 0).mean() if good.any() else 0.0
                overcalled = (lv[~failed] == 2).mean() if (~failed).any() else 0.0
                key = (sensitivity, -alarms, -overcalled, nc, nf, cc, cf, sc)
                if best_key is None or key > best_key:
                    best, best_key = (nc, nf, cc, cf, sc), key
    if best is None:
        raise SystemExit("no limits meet the constraints on these cases")
    nc, nf, cc, cf, sc = (float(v) for v in best)
    chosen = QualityCriteria(nqm_check=nc, nqm_fail=nf, volume_cv_check=cc, volume_cv_fail=cf, scatter_check=sc)
    names = np.array(["ok", "check", "fail"])
    assert list(names[levels_fast(features, nc, nf, cc, cf, sc)]) == verdicts(rows, chosen), "judge disagrees"
    return chosen


def slice_limit(rows: list[dict]) -> tuple[float, dict]:
    """The smallest per-slice limit of the grid whose median count of flagged slices on clean scans is at most
    2 (3.0 when none is), and its figures on ``rows``."""
    scores_clean = [slice_scores(r["slice_std_a"], r["slice_mass_a"]) for r in rows if r["artefact"] == "none"]
    chosen = 3.0
    for limit in np.round(np.arange(0.1, 3.01, 0.05), 2):
        if np.median([(s > limit).sum() for s in scores_clean]) <= 2:
            chosen = float(limit)
            break
    return chosen, slice_figures_at(rows, chosen)


def slice_figures_at(rows: list[dict], limit: float) -> dict:
    """Flagged slices (score above ``limit``) on clean and poor scans, and on poor scans how the slice score
    ranks against slice Dice and wrong voxels, and how many flagged slices are among the worst."""
    scores_clean = [slice_scores(r["slice_std_a"], r["slice_mass_a"]) for r in rows if r["artefact"] == "none"]
    poor = [r for r in rows if r["dice"] < POOR]
    rho_dice, rho_errors, overlap = [], [], []
    for r in poor:
        s, d, e = slice_scores(r["slice_std_a"], r["slice_mass_a"]), r["slice_dice_a"], r["slice_errors_a"]
        keep = np.isfinite(d)
        if keep.sum() >= 4:
            rho_dice.append(spearman(s[keep], d[keep]))
        rho_errors.append(spearman(s, e))
        flagged = np.flatnonzero(s > limit)
        if len(flagged):  # how many flagged slices are among as many slices with the most wrong voxels
            worst = np.argsort(-e, kind="stable")[: len(flagged)]
            overlap.append(len(set(flagged) & set(worst)) / len(flagged))
    return {
        "median_flagged_clean": float(np.median([(s > limit).sum() for s in scores_clean]))
        if scores_clean else float("nan"),
        "median_flagged_poor": float(np.median([(slice_scores(r["slice_std_a"], r["slice_mass_a"]) > limit).sum()
                                                for r in poor])) if poor else float("nan"),
        "spearman_slice_score_vs_dice_poor_median": _median(rho_dice),
        "spearman_slice_score_vs_wrong_voxels_poor_median": _median(rho_errors),
        "flagged_among_worst_slices_poor_mean": float(np.mean(overlap)) if overlap else float("nan"),
        "poor_scans": len(poor),
    }


def _median(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def volume_errors(rows: list[dict], labels_dir: Path, class_names: list[str]) -> dict:
    """Mean absolute and mean signed % error of each class's volume and of the whole structure on clean scans:
    the labels ``mednca segment`` writes (``pred_voxels_<class>``) against the reference label files; and the
    runs' mean relative spread of the whole volume."""
    clean = [r for r in rows if r["artefact"] == "none"]
    errors: dict[str, list[float]] = {name: [] for name in [*class_names, "whole"]}
    for r in clean:
        truth = np.asarray(nib.load(labels_dir / f"{r['case']}.nii.gz").dataobj).astype(np.int64)
        for k, name in enumerate(class_names, start=1):
            true = int((truth == k).sum())
            errors[name].append((int(r[f"pred_voxels_{name}"]) - true) / true)
        errors["whole"].append((int(r["pred_voxels"]) - int((truth > 0).sum())) / int((truth > 0).sum()))
    spread = [float(r["runs_ml"].std() / r["runs_ml"].mean()) for r in clean if r["runs_ml"].mean() > 0]
    out = {f"{name}_mean_abs_pct_error": 100 * float(np.mean(np.abs(e))) for name, e in errors.items()}
    out |= {f"{name}_mean_signed_pct_error": 100 * float(np.mean(e)) for name, e in errors.items()}
    return {**out, "cases": len(clean), "whole_mean_run_cv_pct": 100 * float(np.mean(spread))}


def condition_table(rows: list[dict], levels: list[str]) -> str:
    """Per condition: cases, mean whole Dice, mean NQM and how many cases got each verdict."""
    lines = ["condition    cases  Dice mean (min)   NQM mean   verdicts ok/check/fail"]
    for cond in ["none", *sorted({r["artefact"] for r in rows} - {"none"})]:
        sel = [i for i, r in enumerate(rows) if r["artefact"] == cond]
        dice = np.array([rows[i]["dice"] for i in sel])
        nqm = np.array([rows[i]["nqm_f"] for i in sel])
        counts = "/".join(str(sum(levels[i] == v for i in sel)) for v in ("ok", "check", "fail"))
        lines.append(f"{cond:12s} {len(sel):5d}  {dice.mean():.3f} ({dice.min():.3f})    {nqm.mean():.3f}    {counts}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--fit-on", default=None,
                        help="comma-separated cases to choose the limits on; the others test them")
    parser.add_argument("--write", action="store_true", help="store the limits in the shipped model file")
    args = parser.parse_args()
    all_rows = load_rows(args.results / f"robustness_{args.model}.csv")
    fit_cases = set(args.fit_on.split(",")) if args.fit_on else {r["case"] for r in all_rows}
    unknown = fit_cases - {r["case"] for r in all_rows}
    if unknown:
        raise SystemExit(f"no rows for {sorted(unknown)}")
    rows = [r for r in all_rows if r["case"] in fit_cases]
    unseen = [r for r in all_rows if r["case"] not in fit_cases]
    cases = sorted(fit_cases)
    conditions = sorted({r["artefact"] for r in rows})
    criteria = search(rows)
    limit, slice_figures = slice_limit(rows)
    p = power(rows, verdicts(rows, criteria))
    model = load_model(args.model)
    dice = np.array([r["dice"] for r in rows])
    nqm = np.array([r["nqm_f"] for r in rows])
    summary = {
        "model": args.model, "cases": len(cases), "conditions": conditions, "rows": len(rows),
        "power": p, "auroc_nqm_poor": auroc(nqm, dice < POOR), "auroc_nqm_failed": auroc(nqm, dice < FAILED),
        "slices": slice_figures,
        "volumes": volume_errors(all_rows, args.shared / "data" / "hippocampus" / "labelsTr",
                                 list(model.config.class_names)),
    }
    if unseen:
        fitted = QualityCriteria(**{**criteria.to_dict(), "slice_check": limit})
        summary["unseen"] = {
            "cases": sorted({r["case"] for r in unseen}), "rows": len(unseen),
            "power": power(unseen, verdicts(unseen, fitted)),
            "auroc_nqm_poor": auroc(np.array([r["nqm_f"] for r in unseen]),
                                    np.array([r["dice"] for r in unseen]) < POOR),
            "slices": slice_figures_at(unseen, limit),
            "table": condition_table(unseen, verdicts(unseen, fitted)),
        }
    calibration = {
        "source": "benchmarks/calibrate_quality.py on benchmarks/results/robustness_" + args.model + ".csv",
        "cases": len(cases), "case_ids": cases, "conditions": conditions, "rows": len(rows),
        "runs": int(rows[0]["runs"]),
        "rules": f"every Dice < {FAILED} fails; at most {MAX_FALSE_ALARMS:.0%} of clean Dice >= {GOOD} not ok; "
                 f"then most Dice < {POOR} not ok, fewest Dice >= {GOOD} not ok, fewest Dice >= {FAILED} failed",
        "sensitivity_failed": p["failed_get_fail"][0], "sensitivity_poor": p["poor_get_not_ok"][0],
        "false_alarms_clean_good": p["clean_good_false_alarms"][0], "auroc_nqm_poor": summary["auroc_nqm_poor"],
    }
    criteria = QualityCriteria(**{**criteria.to_dict(), "slice_check": limit, "calibration": calibration})
    summary["criteria"] = criteria.to_dict()
    text = json.dumps(summary, indent=2, default=float)
    (args.results / f"quality_calibration_{args.model}.json").write_text(text + "\n")
    table = condition_table(rows, verdicts(rows, criteria))
    if unseen:
        table += (f"\n\nthe same limits on {len(summary['unseen']['cases'])} cases they were not chosen on:\n"
                  + summary["unseen"]["table"])
    (args.results / f"quality_calibration_{args.model}.txt").write_text(table + "\n\n" + text + "\n")
    print(table + "\n\n" + text)
    if args.write:
        model.provenance["quality_criteria"] = criteria.to_dict()
        path = save_model(model, SHIPPED_DIR / f"{args.model}.safetensors")
        print(f"wrote the limits into {path}")


if __name__ == "__main__":
    main()
