"""The per-scan results table of a batch: verdict, NQM, slices to check and volumes, one row per scan.

A clinician or a study reads a cohort's results from one table, so every segmentation (and every failure)
becomes one row with fixed columns. The file is rewritten atomically after each scan and read back at the
start of the next run: rows of scans skipped because their results exist are kept, recomputed scans replace
their row, so an interrupted batch never loses what it finished. ``.csv`` or ``.json`` by the file name.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import MedNCAError
from .orientation import axis_codes, plane_of
from .staging import staged_file

NOT_ASSESSED = "not assessed"  # a plain segmentation: no quality map, no verdict
FIXED_COLUMNS = ("scan", "status", "output", "std_map", "verdict", "reasons", "nqm", "plane", "flagged_slices",
                 "seconds", "error")


def result_row(scan: Path, outputs: dict[str, Path], result, seconds: float) -> dict:
    """The row of one segmented scan; ``result`` is a Segmentation or a QualityReport."""
    row = {"scan": str(scan), "status": "segmented", "output": str(outputs["seg"]),
           "std_map": str(outputs.get("std", "")), "seconds": round(seconds, 2), "error": "",
           "plane": plane_of(axis_codes(result.labels.affine), result.axis)}
    verdict = getattr(result, "verdict", None)
    if verdict is None:
        row.update(verdict=NOT_ASSESSED, reasons="", nqm="", flagged_slices="")
    else:
        row.update(verdict=verdict.level, reasons="; ".join(verdict.reasons), nqm=round(result.nqm, 4),
                   flagged_slices=" ".join(str(s) for s in result.flagged_slices))
    for v in result.volumes:
        row[f"volume_ml_{v.name}"] = round(v.ml, 4)
        if v.sd_ml is not None:
            row[f"volume_ml_{v.name}_sd"] = round(v.sd_ml, 4)
            row[f"volume_ml_{v.name}_low"] = round(v.low_ml, 4)
            row[f"volume_ml_{v.name}_high"] = round(v.high_ml, 4)
    return row


def failure_row(scan: Path, error: str) -> dict:
    return {"scan": str(scan), "status": "failed", "error": error}


class ReportFile:
    """The results table at ``path``, keyed by scan, kept on disk after every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix.lower() not in (".csv", ".json"):
            raise MedNCAError(f"{self.path.name}: the results table must be a .csv or .json file")
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            self.rows = {row["scan"]: row for row in self._read()}

    def add(self, row: dict) -> None:
        self.rows[row["scan"]] = row
        self._write()

    def _read(self) -> list[dict]:
        try:
            if self.path.suffix.lower() == ".json":
                rows = json.loads(self.path.read_text())
            else:
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise MedNCAError(f"{self.path}: an existing results table cannot be read ({e}); move it away") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "scan" in r for r in rows):
            raise MedNCAError(f"{self.path}: this file is not a mednca results table; choose another name")
        return rows

    def _write(self) -> None:
        rows = list(self.rows.values())
        extra = sorted({k for r in rows for k in r} - set(FIXED_COLUMNS))
        columns = [*FIXED_COLUMNS, *extra]
        try:
            with staged_file(self.path) as tmp, open(tmp, "w", newline="") as f:
                if self.path.suffix.lower() == ".json":
                    json.dump([{c: r.get(c, "") for c in columns} for r in rows], f, indent=1)
                else:
                    writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
                    writer.writeheader()
                    writer.writerows(rows)
        except OSError as e:
            raise MedNCAError(f"{self.path}: the results table could not be written ({e.strerror or e})") from None
