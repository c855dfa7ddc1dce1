"""The per-scan results table of a batch: verdict, NQM, slices to check and volumes, one row per scan.

A clinician or a study reads a cohort's results from one table, so every segmentation (and every failure)
becomes one row with fixed columns. The file is rewritten atomically after each scan and read back at the
start of the next run: rows of scans skipped because their results exist are kept, recomputed scans replace
their row, so an interrupted batch never loses what it finished. ``mednca evaluate --report`` keeps its
per-case scores in the same kind of file (see ``evaluation.ScoreTable``).

``.csv``, ``.json`` or ``.parquet`` by the file name, with the same columns. Parquet (which needs pyarrow)
keeps the numbers as numbers: the columns ``REAL``, ``REAL_PREFIXES`` and ``WHOLE`` name are float64 or int64,
null where a row has no value; every other column is text (a slice list such as "12" stays text).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import MedNCAError
from .orientation import axis_codes, plane_of
from .staging import staged_file

NOT_ASSESSED = "not assessed"  # a plain segmentation: no quality map, no verdict
FIXED_COLUMNS = ("scan", "status", "output", "std_map", "verdict", "reasons", "nqm", "plane", "flagged_slices",
                 "seconds", "error")
FORMATS = (".csv", ".json", ".parquet")
REAL = ("nqm", "seconds")  # Parquet float64 columns: these, and those starting with one of REAL_PREFIXES
REAL_PREFIXES = ("dice_", "volume_ml_")
WHOLE = ("seed", "quality_runs")  # Parquet int64 columns


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
    """A results table at ``path``: rows keyed by their ``key`` columns (a scan; an evaluated case and its
    artefact), ``columns`` first and any other column after them, kept on disk after every change.

    An existing file is read when the table is opened, and a format that cannot be written (a wrong suffix,
    Parquet without pyarrow) is refused then, so a batch never finds out at its end."""

    def __init__(self, path: Path, key: Sequence[str] = ("scan",), columns: Sequence[str] = FIXED_COLUMNS):
        self.path = Path(path)
        self.key, self.columns = tuple(key), tuple(columns)
        self.format = self.path.suffix.lower()
        if self.format not in FORMATS:
            raise MedNCAError(f"{self.path.name}: the results table must be a .csv, .json or .parquet file")
        if self.path.is_dir():
            raise MedNCAError(f"{self.path} is a folder; give a file name for the results table")
        if self.format == ".parquet":
            _pyarrow(self.path)
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            self.rows = {self._key(row): row for row in self._read()}

    def add(self, row: dict) -> None:
        self.add_all([row])

    def add_all(self, rows: Iterable[dict]) -> None:
        """Put the rows in (replacing those with the same key) and write the table once."""
        for row in rows:
            self.rows[self._key(row)] = row
        self._write()

    def _key(self, row: dict) -> tuple:
        return tuple(str(row[k]) for k in self.key)

    def _read(self) -> list[dict]:
        try:
            if self.format == ".json":
                rows = json.loads(self.path.read_text())
            elif self.format == ".parquet":
                rows = [{k: "" if v is None else v for k, v in row.items()}
                        for row in _pyarrow(self.path)[1].read_table(self.path).to_pylist()]
            else:
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
        except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise MedNCAError(f"{self.path}: an existing results table cannot be read ({e}); move it away") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and set(self.key) <= r.keys() for r in rows):
            raise MedNCAError(f"{self.path}: this file is not a mednca results table of this kind (no "
                              f"{' and '.join(self.key)} column); choose another name")
        return rows

    def _write(self) -> None:
        rows = list(self.rows.values())
        extra = sorted({k for r in rows for k in r} - set(self.columns))
        columns = [*self.columns, *extra]
        try:
            with staged_file(self.path) as tmp:
                if self.format == ".parquet":
                    _write_parquet(tmp, columns, rows)
                else:
                    _write_text(tmp, self.format, columns, rows)
        except OSError as e:
            raise MedNCAError(f"{self.path}: the results table could not be written ({e.strerror or e})") from None


def _write_text(path: Path, format: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if format == ".json":
            json.dump([{c: r.get(c, "") for c in columns} for r in rows], f, indent=1)
        else:
            writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def _pyarrow(path: Path):
    """pyarrow and its Parquet module, or the one-line error saying what to install."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MedNCAError(f"{path.name}: writing Parquet needs the pyarrow package (pip install pyarrow, or "
                          "pip install 'napari-nca[cluster]'); or give a .csv or .json file") from None
    return pyarrow, pyarrow.parquet


def _write_parquet(path: Path, columns: list[str], rows: list[dict]) -> None:
    """The rows as a Parquet file, a typed column each (see ``REAL`` and ``WHOLE``)."""
    pa, pq = _pyarrow(path)
    data = {}
    for column in columns:
        values = [row.get(column, "") for row in rows]
        if column in WHOLE:
            data[column] = pa.array([None if v in ("", None) else int(v) for v in values], pa.int64())
        elif column in REAL or column.startswith(REAL_PREFIXES):
            data[column] = pa.array([None if v in ("", None) else float(v) for v in values], pa.float64())
        else:
            data[column] = pa.array(["" if v is None else str(v) for v in values], pa.string())
    pq.write_table(pa.table(data), path)
