"""What a clinician acts on: volumes in mL with their spread across runs, the slices worth checking, a verdict.

A quality map's runs disagree where the model is unsure (M3D-NCA). Raw numbers leave the judgement to the
reader, so this module turns them into decisions with limits calibrated on data and stored in the model
file (``provenance["quality_criteria"]``, covered by its checksum): a fine-tuned model inherits its base's
limits, a model without any uses ``DEFAULT_CRITERIA`` and says so.

- Volumes: each class's voxel count times the voxel volume, from the labels shown; the spread is that of
  the same count in every single run (hippocampal volumetry is the clinical use, and the NCA's own
  randomness gives its uncertainty for free).
- Slices worth checking: ranked by their uncertain mass (sum of the std) relative to the structure's
  typical slice, so slices where almost nothing is predicted do not explode as a per-slice NQM does.
- Verdict: "ok", "check" or "fail" from the NQM, the runs' disagreement on the volume and how scattered the
  labels are, with one plain reason per finding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from .errors import MedNCAError

VERDICTS = ("ok", "check", "fail")


@dataclass(frozen=True)
class VolumeEstimate:
    """The volume of one class (or "whole", all classes together) in mL: ``ml`` from the labels shown,
    and across the single runs their mean, standard deviation and 2.5-97.5 percentile interval."""

    name: str
    ml: float
    runs_mean_ml: float | None = None
    sd_ml: float | None = None
    low_ml: float | None = None
    high_ml: float | None = None

    def text(self) -> str:
        if self.sd_ml is None:
            return f"{self.name} {self.ml:.2f} mL"
        return f"{self.name} {self.ml:.2f} ± {self.sd_ml:.2f} mL"


@dataclass(frozen=True)
class QualityCriteria:
    """Limits of the verdict. ``nqm_check``/``nqm_fail``: NQM above which a scan needs checking / is taken as
    failed; ``volume_cv_check``/``volume_cv_fail``: the same for the runs' relative spread of the whole
    volume; ``scatter_check``: share of labelled voxels outside the largest connected piece above which the
    labels look scattered; ``slice_check``: a slice is worth checking when its uncertain mass exceeds this
    fraction of the structure's typical slice; ``calibration`` says where the numbers come from."""

    nqm_check: float = 0.15
    nqm_fail: float = 0.30
    volume_cv_check: float = 0.05
    volume_cv_fail: float = 0.15
    scatter_check: float = 0.25
    slice_check: float = 0.5
    calibration: dict = field(default_factory=lambda: {"source": "default limits, not calibrated for this model"})

    def __post_init__(self):
        for name in ("nqm_check", "nqm_fail", "volume_cv_check", "volume_cv_fail", "scatter_check", "slice_check"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 100:
                raise MedNCAError(f"quality criteria: {name} must be a positive number, got {value!r}")
        if self.nqm_fail < self.nqm_check or self.volume_cv_fail < self.volume_cv_check:
            raise MedNCAError("quality criteria: a failing limit must not lie below its checking limit")
        if not isinstance(self.calibration, dict):
            raise MedNCAError("quality criteria: calibration must be an object")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> QualityCriteria:
        if not isinstance(d, dict):
            raise MedNCAError(f"quality criteria must be an object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedNCAError(f"quality criteria: unknown fields {sorted(unknown)}")
        return cls(**d)


DEFAULT_CRITERIA = QualityCriteria()


@dataclass(frozen=True)
class Verdict:
    """``level`` is "ok", "check" or "fail"; ``reasons`` say why in plain words (empty when ok)."""

    level: str
    reasons: tuple[str, ...]

    @property
    def headline(self) -> str:
        return {"ok": "OK", "check": "check these slices", "fail": "likely failed"}[self.level]

    def text(self) -> str:
        """The headline and its reasons on one line, e.g. "likely failed: the runs disagree on 55% ..."."""
        return self.headline if not self.reasons else f"{self.headline}: {'; '.join(self.reasons)}"


def criteria_of(provenance: dict) -> QualityCriteria:
    """The model's own calibrated limits, or the defaults when it records none."""
    stored = provenance.get("quality_criteria")
    return DEFAULT_CRITERIA if stored is None else QualityCriteria.from_dict(stored)


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (the affine is in mm)."""
    return abs(float(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Voxels of each class 1..n_classes."""
    return np.bincount(labels.ravel(), minlength=n_classes + 1)[1 : n_classes + 1].astype(np.int64)


def volume_estimates(
    counts: np.ndarray, class_names: tuple[str, ...], ml_per_voxel: float, run_counts: np.ndarray | None = None
) -> list[VolumeEstimate]:
    """One estimate per class and one for the whole structure, from the shown labels' ``counts`` [K] and,
    when given, every run's counts [runs, K]."""
    names = [*class_names, "whole"] if len(class_names) > 1 else list(class_names)
    shown = np.append(counts, counts.sum())[: len(names)] * ml_per_voxel
    if run_counts is None:
        return [VolumeEstimate(n, float(v)) for n, v in zip(names, shown, strict=True)]
    per_run = np.column_stack([run_counts, run_counts.sum(1)])[:, : len(names)] * ml_per_voxel
    low, high = np.percentile(per_run, [2.5, 97.5], axis=0)
    return [
        VolumeEstimate(n, float(v), float(per_run[:, i].mean()), float(per_run[:, i].std()), float(low[i]),
                       float(high[i]))
        for i, (n, v) in enumerate(zip(names, shown, strict=True))
    ]


def scattered_share(labels: np.ndarray) -> float:
    """Share of the labelled voxels outside the largest connected piece (26-connected): near 0 for one
    structure, high when labels are sprinkled over the image, as a failed segmentation's often are."""
    mask = labels > 0
    total = int(mask.sum())
    if total == 0:
        return 0.0
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    largest = np.bincount(pieces.ravel())[1:].max() if n else 0
    return float(1.0 - largest / total)


def slice_scores(slice_std: np.ndarray, slice_mass: np.ndarray) -> np.ndarray:
    """Each slice's uncertain mass relative to the structure's typical slice (the median mass of the
    slices holding at least a tenth of the largest slice's): comparable across slices and scans, and
    small where nothing is predicted and nothing is uncertain."""
    mass = np.asarray(slice_mass, np.float64)
    holding = mass[mass >= 0.1 * mass.max()] if mass.max() > 0 else mass[:0]
    typical = float(np.median(holding)) if holding.size else 1.0
    return np.asarray(slice_std, np.float64) / max(typical, 1.0)


def slices_to_check(scores: np.ndarray, criteria: QualityCriteria) -> list[int]:
    """Slices whose score exceeds the limit, the least trustworthy first."""
    return [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > criteria.slice_check]


def judge(
    nqm: float, whole_runs_ml: np.ndarray | None, scatter: float, labelled: int, criteria: QualityCriteria
) -> Verdict:
    """The verdict and its reasons. ``whole_runs_ml``: the whole volume of each run (None without runs)."""
    if labelled == 0:
        return Verdict("fail", ("nothing was segmented",))
    findings: list[tuple[str, str]] = []
    if nqm > criteria.nqm_check:
        level = "fail" if nqm > criteria.nqm_fail else "check"
        findings.append((level, f"the runs disagree on {_percent(nqm)} of the predicted volume (NQM {nqm:.3f})"))
    if whole_runs_ml is not None and len(whole_runs_ml) > 1 and whole_runs_ml.mean() > 0:
        cv = float(whole_runs_ml.std() / whole_runs_ml.mean())
        if cv > criteria.volume_cv_check:
            level = "fail" if cv > criteria.volume_cv_fail else "check"
            findings.append((level, f"the volume varies by {_percent(cv)} between runs"))
    if scatter > criteria.scatter_check:
        findings.append(("check", f"{_percent(scatter)} of the labelled voxels lie outside the main structure"))
    if not findings:
        return Verdict("ok", ())
    level = "fail" if any(lv == "fail" for lv, _ in findings) else "check"
    return Verdict(level, tuple(reason for _, reason in findings))


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "?"
