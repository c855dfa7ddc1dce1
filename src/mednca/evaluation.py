"""Measuring a model against labelled scans: Dice per case, and whether the quality map can be trusted.

Dice is computed at each scan's NATIVE resolution, on the labels inference really produces (probabilities
resized back to the scan, then labelled), because that is what a user gets; the model-space Dice printed
during training is computed on 64x64 slices and reads higher.

The quality map (NQM = sum of std over sum of mean probability across stochastic runs) is only useful if it
is high where the segmentation is bad. The report therefore gives the correlation between NQM and Dice over
the evaluated cases: a clearly negative value means NQM points at failures, a value near zero means it does
not, and with a handful of cases neither is reliable, so the number of cases is always reported with it.

A model trained with ``mednca.training`` records its validation cases; ``cases="validation"`` evaluates on
exactly those, so a shipped model is scored on scans it never saw.

With ``perturb`` (artefact names, see ``artefacts.py``) each case is scored clean and again under each
artefact, one row per case and condition; the corrupted scans depend only on the seed, the case and the
artefact, so every model evaluated with the same seed sees the same inputs. The report then summarises
each condition separately.

A cohort's evaluation can take hours, so ``ScoreTable`` keeps every case's scores in a results file as it
is scored (``mednca evaluate --report``) and gives them back to the same evaluation run again: only the cases
missing from it are scored. Every case is scored on its own (the model's randomness seeded per scan), so a
table filled over several runs holds the scores one uninterrupted run gives.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artefacts import CLEAN, parse_artefacts, scan_under
from .checkpoint import model_digest
from .data import data_pairs
from .errors import MedNCAError
from .inference import quality_iter, segment_iter
from .model import MedNCA
from .progress import Progress, run_to_end
from .quality import criteria_of
from .report import ReportFile
from .staging import staged_file
from .volume import Volume, check_labels, read_volume

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class CaseResult:
    """One scan's scores. ``dice`` maps each class name to its Dice; ``nqm`` is None without a quality map,
    and so is ``verdict`` (its level: "ok", "check", "fail"); ``artefact`` is the condition the scan was
    scored under ("none": as it is)."""

    case: str
    dice_whole: float
    dice: dict[str, float]
    nqm: float | None
    seconds: float
    artefact: str = CLEAN
    verdict: str | None = None


@dataclass
class EvaluationReport:
    """Per-case scores with their summary. ``columns`` are the numeric columns of the table, in order:
    ``dice_whole``, ``dice_<class>`` for every class of a multi-class model, ``nqm`` (when quality maps were
    computed) and ``seconds``. ``label_columns`` are the text columns before them: ``case``, and ``artefact``
    when some rows were scored under an artefact."""

    rows: list[CaseResult]
    class_names: tuple[str, ...]
    quality_runs: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        cols = ["dice_whole"] + [f"dice_{name}" for name in self._per_class()]
        return cols + (["nqm"] if self.has_quality else []) + ["seconds"]

    @property
    def label_columns(self) -> list[str]:
        return ["case"] + (["artefact"] if self.perturbed else [])

    @property
    def perturbed(self) -> bool:
        """Whether some rows were scored under an artefact (the report then has an ``artefact`` column)."""
        return any(row.artefact != CLEAN for row in self.rows)

    def artefacts(self) -> list[str]:
        """The conditions in the report, in the order they first appear ("none" first when scored)."""
        return list(dict.fromkeys(row.artefact for row in self.rows))

    def by_artefact(self) -> dict[str, EvaluationReport]:
        """One report per condition, holding its rows: its ``summary()`` and ``correlation()`` are that
        condition's."""
        return {
            name: EvaluationReport([r for r in self.rows if r.artefact == name], self.class_names,
                                   self.quality_runs, self.meta)
            for name in self.artefacts()
        }

    @property
    def has_quality(self) -> bool:
        """Whether the cases were scored with quality maps (and so have an NQM)."""
        return any(row.nqm is not None for row in self.rows)

    def _per_class(self) -> tuple[str, ...]:
        # with one class, its Dice is the whole structure's: no second, identical column
        return self.class_names if len(self.class_names) > 1 else ()

    def values(self, column: str) -> np.ndarray:
        """The column's value for every case, in row order (NaN where missing)."""
        return np.array([_nan(_cell(row, column)) for row in self.rows], dtype=np.float64)

    def summary(self) -> dict[str, tuple[float, float]]:
        """Mean and (population) standard deviation of every column over the cases."""
        out = {}
        for col in self.columns:
            v = self.values(col)
            v = v[np.isfinite(v)]
            out[col] = (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)
        return out

    def correlation(self) -> dict[str, float | int]:
        """Pearson and Spearman correlation of NQM with whole-structure Dice across cases, and the number of
        cases ``n`` they rest on. Negative is what a useful quality map shows (high NQM, low Dice); NaN when
        there is no quality map, fewer than 3 cases, or no spread in either column."""
        if not self.has_quality:
            return {"pearson": math.nan, "spearman": math.nan, "n": 0}
        nqm, dice = self.values("nqm"), self.values("dice_whole")
        ok = np.isfinite(nqm) & np.isfinite(dice)
        x, y = nqm[ok], dice[ok]
        return {"pearson": pearson(x, y), "spearman": spearman(x, y), "n": int(x.size)}

    # ---------------------------------------------------------------------------------------- output

    def table(self) -> str:
        """The per-case table with mean ± std (per artefact, when there are artefacts) and the NQM/Dice
        correlation under it, for printing."""
        labels = self.label_columns
        head = labels + self.columns
        body = [[_text(row, col) for col in labels] + [_fmt(col, _cell(row, col)) for col in self.columns]
                for row in self.rows]
        groups = self.by_artefact() if self.perturbed else {"": self}
        means = []
        for name, group in groups.items():
            summary = group.summary()
            means.append(["mean ± std"] + ([name] if self.perturbed else [])
                         + [f"{_fmt(c, summary[c][0])} ± {_fmt(c, summary[c][1])}" for c in self.columns])
        lines = _aligned([head, *body, *means], len(labels))
        rule = "-" * len(lines[0])
        lines = [lines[0], rule, *lines[1 : 1 + len(body)], rule, *lines[1 + len(body) :]]
        cases = len({row.case for row in self.rows})
        lines.append(f"{cases} case" + ("" if cases == 1 else "s")
                     + (f" x {len(groups)} conditions ({', '.join(groups)})" if self.perturbed else ""))
        if self.has_quality:
            runs = f" ({self.quality_runs} runs each)" if self.quality_runs else ""
            meaning = "negative: high NQM flags bad cases; n/a under 3 cases"
            for name, group in groups.items():
                c = group.correlation()
                lines.append(
                    f"NQM vs whole Dice{f' [{name}]' if name else ''} over {c['n']} cases{runs}: Pearson "
                    f"{_signed(c['pearson'])}, Spearman {_signed(c['spearman'])}"
                    + ("" if self.perturbed else f" ({meaning})")
                )
            if self.perturbed:
                lines.append(f"({meaning})")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per case and condition (no summary rows, so the file loads straight into a data frame)."""
        labels = self.label_columns
        rows = [labels + self.columns]
        rows += [[_text(row, col) for col in labels] + [_csv_value(_cell(row, col)) for col in self.columns]
                 for row in self.rows]
        return _atomic_write(path, lambda f: csv.writer(f, lineterminator="\n").writerows(rows))

    def to_json(self, path: str | os.PathLike) -> Path:
        """Rows, summary, correlation and how the evaluation was run (model, seed, runs)."""
        doc = {
            "class_names": list(self.class_names),
            "quality_runs": self.quality_runs,
            "meta": self.meta,
            "rows": [
                {"case": r.case, "artefact": r.artefact, "dice_whole": r.dice_whole, "dice": r.dice, "nqm": r.nqm,
                 "seconds": r.seconds}
                for r in self.rows
            ],
            "summary": _json_summary(self),
            "correlation": {k: _json_num(v) for k, v in self.correlation().items()},
        }
        if self.perturbed:
            doc["by_artefact"] = {
                name: {"summary": _json_summary(group),
                       "correlation": {k: _json_num(v) for k, v in group.correlation().items()}}
                for name, group in self.by_artefact().items()
            }
        return _atomic_write(path, lambda f: json.dump(doc, f, indent=2))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvaluationReport:
        doc = json.loads(Path(path).read_text())
        rows = [CaseResult(r["case"], r["dice_whole"], r["dice"], r["nqm"], r["seconds"], r.get("artefact", CLEAN))
                for r in doc["rows"]]
        return cls(rows, tuple(doc["class_names"]), doc["quality_runs"], doc.get("meta", {}))

    @classmethod
    def from_csv(cls, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> EvaluationReport:
        """Read back ``to_csv``'s file. The file holds no run count (``quality_runs`` is 0), and a single-class
        model's class name is not in it: pass it as ``class_names`` (default "foreground")."""
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
            header = records[0].keys() if records else []
        named = tuple(c.removeprefix("dice_") for c in header if c.startswith("dice_") and c != "dice_whole")
        names = named or tuple(class_names or ("foreground",))
        rows = []
        for rec in records:
            whole = float(rec["dice_whole"])
            dice = {n: float(rec[f"dice_{n}"]) for n in named} or {names[0]: whole}
            nqm = float(rec["nqm"]) if rec.get("nqm") else None
            rows.append(CaseResult(rec["case"], whole, dice, nqm, float(rec["seconds"]), rec.get("artefact") or CLEAN))
        return cls(rows, names)


# ------------------------------------------------------------------------------------------- scores


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks. Both empty counts as 1.0: the model correctly found nothing."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, target).sum()) / total


def case_dice(pred: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Whole-structure Dice (any label > 0 against any prediction > 0) and Dice per class (label k against
    prediction k, class k named ``class_names[k - 1]``). With one class, every label > 0 is that class, as in
    training. Both empty counts as 1.0."""
    if pred.shape != labels.shape:
        raise MedNCAError(f"prediction shape {pred.shape} does not match the labels' shape {labels.shape}")
    whole = dice_score(pred > 0, labels > 0)
    if len(class_names) == 1:
        return whole, {class_names[0]: whole}
    top = int(labels.max(initial=0))
    if top > len(class_names):
        raise MedNCAError(f"the labels hold class {top}, but the model has only {len(class_names)} classes")
    return whole, {name: dice_score(pred == k, labels == k) for k, name in enumerate(class_names, start=1)}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN with fewer than 3 pairs or a constant column."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or x.size != y.size or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum()) / math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties sharing their average rank."""
    return pearson(ranks(x), ranks(y))


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; equal values get the mean of the ranks they span."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    out = np.empty(values.size, np.float64)
    start = 0
    while start < values.size:
        end = start + 1
        while end < values.size and sorted_vals[end] == sorted_vals[start]:
            end += 1
        out[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
        start = end
    return out


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_iter(
    model: MedNCA,
    data,
    *,
    quality_runs: int = 0,
    seed: int = 0,
    cases: str | Sequence[str] | None = None,
    threads: int | None = None,
    perturb: Sequence[str] = (),
) -> Generator[Progress, None, EvaluationReport]:
    """Score ``model`` on labelled scans; yields ``Progress`` and returns the report.

    ``Progress.done`` counts finished scorings (cases, times conditions with ``perturb``) and ``stage`` names
    the case being worked on (and its artefact); while one runs, progress is also yielded after every chunk
    of slices (``done`` unchanged), so stopping the iteration cancels within seconds, not only between cases.

    ``data``: a Decathlon task folder, or a list of (image, label) pairs given as paths or Volumes.
    ``cases``: None or "all" for every case, "validation" for the model's recorded validation cases, or a
    list of case ids (file names without extension, e.g. "hippocampus_374"). With ``quality_runs >= 2``
    each case gets a quality map of that many runs: its NQM is reported and its labels (from the mean
    probability) are scored; otherwise the plain segmentation is scored. Stopping the iteration cancels.
    ``perturb``: artefact names (``artefacts.ARTEFACTS``, or "all"): each case is scored clean and then under
    each of them, the artefact seeded by (``seed``, case, artefact) only, so every model gets the same scans.
    """
    if quality_runs == 1 or quality_runs < 0:
        raise MedNCAError(f"a quality map needs at least 2 runs (or 0 for none), got {quality_runs}")
    conditions = (CLEAN, *parse_artefacts(perturb))
    chosen = select_cases(model, data_pairs(data), cases)
    if not chosen:
        raise MedNCAError("no cases selected to evaluate")
    names = model.config.class_names
    rows: list[CaseResult] = []
    total = len(chosen) * len(conditions)
    yield Progress(0, total, "evaluate")
    for case, image, label in chosen:
        try:
            volume = image if isinstance(image, Volume) else read_volume(image)
            labels = check_labels(label if isinstance(label, Volume) else read_volume(label), volume)
        except MedNCAError as e:
            raise MedNCAError(f"case {case}: {e}") from None
        for artefact in conditions:
            start = time.perf_counter()
            stage = case if artefact == CLEAN else f"{case} ({artefact})"
            scan = scan_under(volume, case, artefact, seed)
            opts = dict(seed=seed, threads=threads)
            if quality_runs >= 2:
                work = quality_iter(model, scan, quality_runs, **opts)
            else:
                work = segment_iter(model, scan, **opts)
            result = yield from _as_case_progress(work, len(rows), total, stage)
            nqm, verdict = (result.nqm, result.verdict.level) if quality_runs >= 2 else (None, None)
            whole, per_class = case_dice(result.labels.array, labels, names)
            rows.append(CaseResult(case, whole, per_class, nqm, time.perf_counter() - start, artefact, verdict))
            yield Progress(len(rows), total, stage)
    meta = {"seed": seed, "model": model.provenance.get("source", ""), "cases": _describe(cases)}
    if len(conditions) > 1:
        meta["perturb"] = list(conditions[1:])
    return EvaluationReport(rows, tuple(names), quality_runs, meta)


def evaluate(model: MedNCA, data, **kwargs) -> EvaluationReport:
    """``evaluate_iter`` run to the end (see it for the options)."""
    return run_to_end(evaluate_iter(model, data, **kwargs))


def _as_case_progress(work: Generator, done: int, total: int, case: str) -> Generator[Progress, None, object]:
    """Pass an inference generator's slice progress on as case progress; return its result."""
    while True:
        try:
            next(work)
        except StopIteration as stop:
            return stop.value
        yield Progress(done, total, case)


def select_cases(model: MedNCA, pairs: list, cases: str | Sequence[str] | None) -> list:
    """The pairs named by ``cases`` (see ``evaluate_iter``), in the data's order."""
    if cases is None or cases == "all":
        return pairs
    if cases == "validation":
        wanted = model.provenance.get("validation_cases")
        if not wanted:
            raise MedNCAError(
                "the model records no validation cases (it was not trained with mednca.training); "
                "choose the cases to evaluate, or all of them"
            )
    elif isinstance(cases, str):
        raise MedNCAError(f"cases must be 'all', 'validation' or a list of case ids, got {cases!r}")
    else:
        wanted = list(cases)
    known = {c for c, _, _ in pairs}
    missing = [c for c in wanted if c not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise MedNCAError(f"{len(missing)} requested case(s) are not in the data: {shown}")
    wanted_set = set(wanted)
    return [p for p in pairs if p[0] in wanted_set]


def _describe(cases) -> str | list[str]:
    return "all" if cases is None else cases if isinstance(cases, str) else list(cases)


# -------------------------------------------------------------------------------------- scores table


SCORED, FAILED = "scored", "failed"  # a row's status
SETTING_NAMES = {"model_digest": "model digest", "seed": "--seed", "quality_runs": "--quality"}  # as users know them


class ScoreTable:
    """The per-case scores of one evaluation (one model, seed and number of quality runs) in a results file
    (CSV, JSON or Parquet, see ``report.ReportFile``), one row per case and condition, written as cases finish.

    A file that holds scores of another model or other settings is refused rather than mixed or replaced:
    scores only make sense side by side when they were computed the same way. The model is told by a digest
    of what decides its output (weights, architecture, preprocessing, quality limits), not by its name, so a
    copy or a renamed file keeps its scores. Threads and Dask workers change no score and are not settings.
    """

    def __init__(self, path: Path, model: MedNCA, model_name: str, *, seed: int, quality_runs: int):
        self.class_names = tuple(model.config.class_names)
        per_class = [f"dice_{n}" for n in self.class_names] if len(self.class_names) > 1 else []
        columns = ("case", "artefact", "scan", "status", "dice_whole", *per_class, "nqm", "verdict", "seconds",
                   "worker", "error", "model", "model_digest", "seed", "quality_runs")
        self.file = ReportFile(path, key=("case", "artefact"), columns=columns)
        self.settings = {"model_digest": scoring_digest(model), "seed": seed, "quality_runs": quality_runs}
        self.model_name = model_name
        for row in self.file.rows.values():
            self._refuse_other_settings(row)

    @property
    def path(self) -> Path:
        return self.file.path

    def scored(self, cases: Sequence[str], conditions: Sequence[str]) -> dict[str, list[CaseResult]]:
        """The cases whose every condition has its scores in the table, with them (failed cases are not)."""
        done = {}
        for case in cases:
            rows = [self.file.rows.get((case, condition)) for condition in conditions]
            if all(row is not None and row.get("status") == SCORED for row in rows):
                done[case] = [self._result(row) for row in rows]
        return done

    def add(self, case: str, scan: str, results: list[CaseResult], worker: str = "") -> None:
        """A scored case's rows, written at once."""
        self.file.add_all({**self._common(case, r.artefact, scan, worker), **self._scores(r)} for r in results)

    def add_failure(self, case: str, scan: str, conditions: Sequence[str], error: str, worker: str = "") -> None:
        """A case that could not be scored: a failed row with the reason for each condition."""
        self.file.add_all({**self._common(case, condition, scan, worker), "status": FAILED, "error": error}
                          for condition in conditions)

    def _common(self, case: str, artefact: str, scan: str, worker: str) -> dict:
        return {"case": case, "artefact": artefact, "scan": scan, "worker": worker, "model": self.model_name,
                **self.settings}

    def _scores(self, r: CaseResult) -> dict:
        per_class = {f"dice_{n}": r.dice[n] for n in self.class_names} if len(self.class_names) > 1 else {}
        return {"status": SCORED, "dice_whole": r.dice_whole, **per_class, "nqm": "" if r.nqm is None else r.nqm,
                "verdict": r.verdict or "", "seconds": round(r.seconds, 2), "error": ""}

    def _result(self, row: dict) -> CaseResult:
        """A row read back (text from CSV, numbers from JSON or Parquet) as the CaseResult it was made from."""
        whole = float(row["dice_whole"])
        if len(self.class_names) > 1:
            dice = {n: float(row[f"dice_{n}"]) for n in self.class_names}
        else:
            dice = {self.class_names[0]: whole}
        nqm = None if row.get("nqm") in ("", None) else float(row["nqm"])
        return CaseResult(row["case"], whole, dice, nqm, float(row["seconds"]), row["artefact"],
                          row.get("verdict") or None)

    def _refuse_other_settings(self, row: dict) -> None:
        differ = [(k, row.get(k, ""), v) for k, v in self.settings.items() if str(row.get(k, "")) != str(v)]
        if differ:
            shown = "; ".join(f"{SETTING_NAMES[k]} {_short(there)} there, {_short(here)} here"
                              for k, there, here in differ)
            raise MedNCAError(f"{self.path} holds scores of another model or other settings ({shown}); scores are "
                              "never mixed: give another --report file, or move this one away")


def scoring_digest(model: MedNCA) -> str:
    """SHA-256 of what decides a model's scores: its weights, architecture, preprocessing and quality limits."""
    described = {"architecture": model.config.to_dict(), "preprocessing": model.preprocessing.to_dict(),
                 "quality_criteria": criteria_of(model.provenance).to_dict()}
    return model_digest(model.state_dict(), described)


def _short(value) -> str:
    text = str(value)
    return repr(text) if not text else text[:12] if len(text) == 64 else text


# ------------------------------------------------------------------------------------------- helpers


def _text(row: CaseResult, column: str) -> str:
    return row.case if column == "case" else row.artefact


def _cell(row: CaseResult, column: str) -> float | None:
    if column == "dice_whole":
        return row.dice_whole
    if column == "nqm":
        return row.nqm
    if column == "seconds":
        return row.seconds
    return row.dice.get(column.removeprefix("dice_"))


def _aligned(rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """Rows of cells as text columns: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells))
    return lines


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _fmt(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if column == "seconds" else f"{value:.4f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "n/a"


def _csv_value(value) -> str:
    return "" if value is None else repr(float(value))


def _json_summary(report: EvaluationReport) -> dict:
    return {k: {"mean": _json_num(m), "std": _json_num(s)} for k, (m, s) in report.summary().items()}


def _json_num(value):
    """JSON has no NaN: a missing statistic is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Write a text file through a temporary file in the same folder, so a crash never leaves half a file."""
    path = Path(path)
    if path.is_dir():
        raise MedNCAError(f"{path} is a folder; give a file name to write the report to")
    with staged_file(path) as tmp, open(tmp, "w", newline="") as f:
        write(f)
    return path
