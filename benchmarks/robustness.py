"""Robustness of the hippocampus models under MRI artefacts: Dice and the quality map, clean and corrupted.

    python benchmarks/robustness.py [--models hippocampus hippocampus_msd authors] [--cases ID,ID,... | --limit K]
                                    [--runs 10] [--artefacts all] [--threads 1] [--seed 0] [--shared ../shared]

Every model segments the default model's held-out validation cases (its provenance), each clean and under
every artefact of ``mednca.artefacts`` (fixed strengths, documented there), with a quality map of ``--runs``
stochastic runs. The corrupted scan depends only on the seed, the case and the artefact, so all models see
identical inputs. "authors" is the Med-NCA authors' model in ``--shared``/reference/mednca_hippocampus.

Results go to benchmarks/results/ (``--results``):
- robustness_<model>.csv: one row per case and condition, with everything needed to calibrate a quality
  verdict offline (see COLUMNS). The run is incremental: rows already in the file for the same case,
  condition, runs and seed are skipped, so an interrupted run continues where it stopped; the file is
  rewritten whole after every row (never half a file).
- robustness.txt and robustness.json: mean whole Dice, its change from clean on the same cases, and mean NQM
  per model and condition, with the NQM/Dice rank correlation; rewritten after every case from the CSVs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import mednca
from mednca.artefacts import ARTEFACTS, CLEAN, parse_artefacts, scan_under
from mednca.checkpoint import weights_digest
from mednca.data import data_pairs
from mednca.evaluation import case_dice, select_cases, spearman
from mednca.inference import QualityReport, quality_map
from mednca.model import MedNCA
from mednca.registry import DEFAULT_MODEL, load_model
from mednca.staging import staged_file
from mednca.volume import check_labels, read_volume

REPO = Path(__file__).resolve().parents[1]
AUTHORS = "authors"
KEY = ("case", "artefact", "runs", "seed")  # a row is done when these match
COLUMNS = {
    "model": "the model's label (file name part)",
    "weights": "the first 16 hex digits of the model's weights digest: a file's rows are all of one model",
    "case": "case id", "artefact": "condition: none (clean) or the artefact",
    "runs": "stochastic runs of the quality map", "seed": "seed of the runs and of the artefact",
    "dice_whole": "Dice of labels > 0 (from the mean probability) against labels > 0",
    "dice_<class>": "Dice per class (a single-class model: equal to dice_whole)",
    "nqm": "NQM as the engine reports it: sum of std / sum of mean probability on the model's 64x64 slices",
    "std_sum": "sum of the per-voxel std over all voxels and classes, at the scan's native resolution",
    "mean_sum": "sum of the mean probability, native resolution (std_sum / mean_sum: NQM at native size)",
    "pred_voxels": "voxels labelled > 0 (from the mean probability)", "pred_voxels_<class>": "voxels of class k",
    "label_voxels": "voxels > 0 in the reference labels", "voxel_mm3": "volume of one voxel in mm^3",
    "std_pred_mean": "mean std of the predicted class over the labelled voxels (NaN if none)",
    "mean_prob_pred": "mean probability of the predicted class over the labelled voxels (NaN if none)",
    "std_max": "largest per-voxel std (max over classes)",
    "voxels_std_gt_0.1": "voxels whose std (max over classes) exceeds 0.1",
    "voxels_std_gt_0.2": "voxels whose std (max over classes) exceeds 0.2",
    "slice_nqm_max": "largest per-slice NQM", "slice_nqm_mean": "mean per-slice NQM over all slices",
    "slice_nqm_p90": "90th percentile of the per-slice NQM",
    "flagged_slices": "slices the engine flags as worth checking (the model's own criteria)",
    "slices": "slices along the model's axis",
    "verdict": "the engine's verdict with the model's criteria when the row was computed",
    "scattered": "share of labelled voxels outside the largest connected piece",
    "volume_ml": "whole volume shown (mL)", "volume_ml_true": "whole volume of the reference labels (mL)",
    "run_volumes_ml": "whole volume of each single run (mL), JSON list",
    "slice_std": "per slice (scan order along the model's axis): sum of std in model space, JSON list",
    "slice_mass": "per slice: sum of the mean probability in model space, JSON list",
    "slice_dice": "per slice: whole Dice (NaN where neither prediction nor reference has a voxel), JSON list",
    "slice_errors": "per slice: voxels where prediction and reference disagree, JSON list",
    "seconds": "time for the quality map and scoring",
}


def columns_for(model: MedNCA) -> list[str]:
    """The CSV header for ``model``: COLUMNS with the per-class entries spelled out."""
    names = model.config.class_names
    out = []
    for col in COLUMNS:
        out += [col.replace("<class>", n) for n in names] if "<class>" in col else [col]
    return out


def case_row(q: QualityReport, labels: np.ndarray, names: tuple[str, ...], voxel_mm3: float) -> dict:
    """Scores and quality-map statistics of one scored scan (see COLUMNS)."""
    pred = q.labels.array
    whole, per_class = case_dice(pred, labels, names)
    std_max = q.std.max(0)
    labelled = pred > 0
    if labelled.any():
        k = (pred[labelled].astype(np.int64) - 1)[None]  # the predicted class of each labelled voxel
        std_pred_mean = float(np.take_along_axis(q.std[:, labelled], k, 0).mean())
        mean_prob_pred = float(np.take_along_axis(q.mean[:, labelled], k, 0).mean())
    else:
        std_pred_mean = mean_prob_pred = math.nan
    row = {"dice_whole": whole, **{f"dice_{n}": d for n, d in per_class.items()}, "nqm": q.nqm,
           "std_sum": float(q.std.sum(dtype=np.float64)), "mean_sum": float(q.mean.sum(dtype=np.float64)),
           "pred_voxels": int(labelled.sum())}
    row.update({f"pred_voxels_{n}": int((pred == i).sum()) for i, n in enumerate(names, start=1)})
    slice_nqm = np.asarray(q.slice_nqm, np.float64)
    row.update({
        "label_voxels": int((labels > 0).sum()), "voxel_mm3": voxel_mm3,
        "std_pred_mean": std_pred_mean, "mean_prob_pred": mean_prob_pred, "std_max": float(std_max.max()),
        "voxels_std_gt_0.1": int((std_max > 0.1).sum()), "voxels_std_gt_0.2": int((std_max > 0.2).sum()),
        "slice_nqm_max": float(slice_nqm.max()), "slice_nqm_mean": float(slice_nqm.mean()),
        "slice_nqm_p90": float(np.percentile(slice_nqm, 90)), "flagged_slices": len(q.flagged_slices),
        "slices": int(slice_nqm.size), "verdict": q.verdict.level, "scattered": q.scattered,
        "volume_ml": q.volumes[-1].ml, "volume_ml_true": int((labels > 0).sum()) * voxel_mm3 / 1000,
        "run_volumes_ml": json.dumps([round(float(v) * voxel_mm3 / 1000, 4) for v in q.run_counts.sum(1)]),
        "slice_std": _json_list(q.slice_std), "slice_mass": _json_list(q.slice_mass),
    })
    pred_s, true_s = np.moveaxis(labelled, q.axis, 0), np.moveaxis(labels > 0, q.axis, 0)
    inter = (pred_s & true_s).sum((1, 2))
    sizes = pred_s.sum((1, 2)) + true_s.sum((1, 2))
    row["slice_dice"] = _json_list(np.where(sizes > 0, 2 * inter / np.maximum(sizes, 1), np.nan))
    row["slice_errors"] = json.dumps((pred_s ^ true_s).sum((1, 2)).tolist())
    return row


def _json_list(values: np.ndarray) -> str:
    return json.dumps([None if not np.isfinite(v) else round(float(v), 4) for v in values])


# ------------------------------------------------------------------------------------------ results files


class ResultsFile:
    """One model's per-case CSV: the rows so far, which keys are done, and whole-file atomic rewrites. A file
    holding rows of other weights (a model replaced under the same name) is refused, not resumed: its rows
    would count as done and mix two models' results. Rows written before the weights column existed carry
    none and are taken as the model's."""

    def __init__(self, path: Path, header: list[str], weights: str):
        self.path, self.header = path, header
        self.rows: list[dict] = []
        if path.exists():
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        other = {r.get("weights") for r in self.rows} - {None, "", weights}
        if other:
            raise SystemExit(f"{path} holds results of other weights ({', '.join(sorted(other))}) than this "
                             f"model's ({weights}): move it away, or give another --results folder")
        self.done = {self.key(r) for r in self.rows}

    @staticmethod
    def key(row: dict) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in KEY)

    def add(self, row: dict) -> None:
        self.rows.append({k: _text(v) for k, v in row.items()})
        self.done.add(self.key(row))
        header = list(dict.fromkeys(self.header + [c for r in self.rows for c in r]))  # older rows' columns too
        with staged_file(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, header, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)


def _text(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


# ------------------------------------------------------------------------------------------------ summary


def summarise(files: dict[str, ResultsFile], conditions: list[str], runs: int, seed: int, cases: set[str]) -> dict:
    """Per model and condition: cases, mean ± std whole Dice, mean change from clean on the same cases,
    mean ± std NQM; per model the NQM/Dice Spearman correlation over all its rows (every condition). Only the
    (case, condition) pairs every model has are counted, so models are compared on identical inputs."""
    selected = {label: [r for r in results.rows if r["runs"] == str(runs) and r["seed"] == str(seed)
                        and r["case"] in cases]
                for label, results in files.items()}
    common = set.intersection(*({(r["case"], r["artefact"]) for r in rows} for rows in selected.values()))
    out = {}
    for label, rows in selected.items():
        rows = [r for r in rows if (r["case"], r["artefact"]) in common]
        clean = {r["case"]: float(r["dice_whole"]) for r in rows if r["artefact"] == CLEAN}
        per = {}
        for cond in conditions:
            sel = [r for r in rows if r["artefact"] == cond]
            if not sel:
                continue
            dice = np.array([float(r["dice_whole"]) for r in sel])
            nqm = np.array([float(r["nqm"]) for r in sel])
            delta = [float(r["dice_whole"]) - clean[r["case"]] for r in sel if r["case"] in clean]
            per[cond] = {"cases": len(sel), "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
                         "dice_change": float(np.mean(delta)) if delta else None,
                         "nqm_mean": float(nqm.mean()), "nqm_std": float(nqm.std()),
                         "spearman_nqm_dice": _finite(spearman(nqm, dice))}
        dice = np.array([float(r["dice_whole"]) for r in rows])
        nqm = np.array([float(r["nqm"]) for r in rows])
        out[label] = {"conditions": per, "rows": len(rows), "spearman_nqm_dice_all": _finite(spearman(nqm, dice))}
    first, *others = selected
    for label in others:
        out[label]["paired_with"] = {"model": first, "conditions": paired(selected[label], selected[first], common)}
    return out


def paired(rows: list[dict], baseline: list[dict], common: set) -> dict:
    """Per condition, this model's whole Dice minus the baseline's on the same cases: mean, its standard error
    and how many cases improved. A model differs from another by less than the spread of Dice across cases, so
    whether it is better is read from the differences case by case, not from two means."""
    ours = {(r["case"], r["artefact"]): float(r["dice_whole"]) for r in rows}
    theirs = {(r["case"], r["artefact"]): float(r["dice_whole"]) for r in baseline}
    out = {}
    for cond in sorted({c for _, c in common}):
        diff = np.array([ours[k] - theirs[k] for k in sorted(common) if k[1] == cond])
        se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else None
        out[cond] = {"cases": int(diff.size), "diff_mean": float(diff.mean()), "diff_se": se,
                     "better": int((diff > 0).sum())}
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summary_text(summary: dict, conditions: list[str], header: list[str]) -> str:
    labels = list(summary)
    head = ["condition"] + [f"{label}: Dice (change) / NQM" for label in labels]
    table = [head]
    for cond in conditions:
        cells = [cond]
        for label in labels:
            s = summary[label]["conditions"].get(cond)
            if s is None:
                cells.append("-")
                continue
            change = "" if s["dice_change"] is None or cond == CLEAN else f" ({s['dice_change']:+.3f})"
            cells.append(f"{s['dice_mean']:.3f} ± {s['dice_std']:.3f}{change} / {s['nqm_mean']:.4f}  n={s['cases']}")
        table.append(cells)
    rho = ["Spearman(NQM, Dice), all rows"] + [_rho(summary[label]["spearman_nqm_dice_all"]) for label in labels]
    table.append(rho)
    return "\n".join([*header, "", *_aligned(table), *paired_text(summary, conditions), ""])


def paired_text(summary: dict, conditions: list[str]) -> list[str]:
    """The paired differences against the first model, one table, or nothing for a single model."""
    others = [label for label in summary if "paired_with" in summary[label]]
    if not others:
        return []
    first = summary[others[0]]["paired_with"]["model"]
    table = [["condition"] + [f"{label} - {first}: mean ± se (cases better)" for label in others]]
    for cond in conditions:
        cells = [cond]
        for label in others:
            d = summary[label]["paired_with"]["conditions"].get(cond)
            se = "" if d is None or d["diff_se"] is None else f" ± {d['diff_se']:.4f}"
            cells.append("-" if d is None else f"{d['diff_mean']:+.4f}{se} ({d['better']} of {d['cases']})")
        table.append(cells)
    return ["", f"Whole Dice paired by case against {first}:", "", *_aligned(table)]


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]


def _rho(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


# --------------------------------------------------------------------------------------------------- main


def load(name: str, shared: Path) -> tuple[str, MedNCA]:
    """(file label, model): "authors" is the reference model in ``shared``; a path is labelled by its stem."""
    if name == AUTHORS:
        return AUTHORS, load_model(shared / "reference" / "mednca_hippocampus")
    return Path(name).name.removesuffix(".safetensors"), load_model(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "hippocampus_msd", AUTHORS],
                        help=f"shipped or user models, model files, or '{AUTHORS}' (the reference model)")
    parser.add_argument("--cases", default="validation",
                        help="'validation' (the default model's held-out cases) or ID,ID,...")
    parser.add_argument("--limit", type=int, default=None, help="only the first K of those cases")
    parser.add_argument("--runs", type=int, default=10, help="stochastic runs per quality map")
    parser.add_argument("--artefacts", default="all", help="comma-separated artefacts, or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the runs and of the artefacts")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch and SimpleITK)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)  # motion and anisotropy resample with it

    data = args.shared / "data" / "hippocampus"
    conditions = [CLEAN, *parse_artefacts(args.artefacts)]
    wanted = "validation" if args.cases == "validation" else [c.strip() for c in args.cases.split(",") if c.strip()]
    pairs = select_cases(load_model(DEFAULT_MODEL), data_pairs(data), wanted)[: args.limit]
    asked = {case for case, _, _ in pairs}
    models = dict(load(name, args.shared) for name in args.models)
    args.results.mkdir(parents=True, exist_ok=True)
    weights = {label: weights_digest(m.state_dict())[:16] for label, m in models.items()}
    files = {label: ResultsFile(args.results / f"robustness_{label}.csv", columns_for(m), weights[label])
             for label, m in models.items()}

    todo = sum((case, c, str(args.runs), str(args.seed)) not in files[label].done
               for case, _, _ in pairs for c in conditions for label in models)
    total = len(pairs) * len(conditions) * len(models)
    print(f"{len(pairs)} cases x {len(conditions)} conditions x {len(models)} models = {total} quality maps of "
          f"{args.runs} runs; {total - todo} already done, {todo} to do", flush=True)
    header = header_lines(args, len(pairs), conditions)
    spent, computed = 0.0, 0
    for case, image_path, label_path in pairs:
        if all((case, c, str(args.runs), str(args.seed)) in files[label].done for c in conditions for label in models):
            continue
        volume = read_volume(image_path)
        labels = check_labels(read_volume(label_path), volume)
        voxel_mm3 = float(np.prod(volume.spacing))
        for cond in conditions:
            scan = None  # made once per case and condition, the same for every model
            for label, model in models.items():
                key = (case, cond, str(args.runs), str(args.seed))
                if key in files[label].done:
                    continue
                scan = scan if scan is not None else scan_under(volume, case, cond, args.seed)
                start = time.perf_counter()
                q = quality_map(model, scan, args.runs, seed=args.seed, threads=args.threads)
                row = case_row(q, labels, model.config.class_names, voxel_mm3)
                seconds = time.perf_counter() - start
                files[label].add({"model": label, "weights": weights[label], "case": case, "artefact": cond,
                                  "runs": args.runs, "seed": args.seed, **row, "seconds": seconds})
                spent, computed = spent + seconds, computed + 1
                left = (todo - computed) * spent / computed
                print(f"[{computed}/{todo}] {label} {case} {cond}: Dice {row['dice_whole']:.3f} NQM {row['nqm']:.4f} "
                      f"{seconds:.0f} s; about {left / 3600:.1f} h left", flush=True)
        write_summary(files, conditions, args, header, asked)
    write_summary(files, conditions, args, header, asked)
    print(f"done: {args.results / 'robustness.txt'}", flush=True)


def code_version() -> str:
    """The commit, and whether the engine that runs is that commit's: uncommitted changes in it, or an engine
    imported from elsewhere (a snapshot), are named."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "?"
    engine = Path(mednca.__file__).resolve().parent
    if engine != REPO / "src" / "mednca":
        return f"commit {commit}, engine imported from {engine}"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "src/mednca").splitlines()]
    return f"commit {commit}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def header_lines(args, n_cases: int, conditions: list[str]) -> list[str]:
    machine = f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}"
    return [
        f"Robustness on {n_cases} held-out hippocampus cases (the default model's validation cases): whole Dice",
        f"at native resolution from {args.runs}-run quality maps (seed {args.seed}), clean and under each artefact",
        "of mednca.artefacts (fixed strengths, see its docstring); identical corrupted scans for every model.",
        "Cells: mean ± std Dice over cases (change from clean on the same cases) / mean NQM, n = cases scored.",
        f"{machine}; {code_version()}; per-case rows in robustness_<model>.csv.",
        f"Conditions: {', '.join(conditions)} (all artefacts: {', '.join(ARTEFACTS)}).",
        "Caveat: the authors trained on their own random 70% of MSD Task04, so some of these cases were probably",
        "in their training set, which favours their model.",
    ]


def write_summary(files: dict[str, ResultsFile], conditions: list[str], args, header: list[str],
                  cases: set[str]) -> None:
    """robustness.txt and .json over ``cases`` only (a file may hold rows of other cases from other runs)."""
    summary = summarise(files, conditions, args.runs, args.seed, cases)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = summary_text(summary, conditions, [*header, f"Written {when}."])
    (args.results / "robustness.txt").write_text(text)
    doc = {"runs": args.runs, "seed": args.seed, "conditions": conditions, "written": when,
           "columns": COLUMNS, "models": summary}
    (args.results / "robustness.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
