"""Planning a batch of segmentations before any work: which files are scans, and where each result goes.

Everything that could lose a result is decided here, up front, so a long batch never finds out at its end:

- a folder's scans never include our own results (names ending in ``_seg`` or ``_std``), so a folder
  segmented into itself is not segmented again, result by result, at the next run;
- inputs that would write the same result (``sub-01/T1w.nii.gz`` and ``sub-02/T1w.nii.gz``, or ``case.nii.gz``
  and ``case.nrrd``) get distinct names: their parent folders' names, else their file types;
- two results that still meet in one file, and a result that would replace an input, are refused.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from .errors import MedNCAError

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
RESULT_KINDS = ("seg", "std")  # a segmentation, a quality (std) map: written as <name>_<kind>.nii.gz
LOOKED_FOR = ", ".join(SCAN_SUFFIXES) + " and DICOM series"


@dataclass(frozen=True)
class Job:
    """One scan and the file each of its results goes to (result kind -> path)."""

    scan: Path
    outputs: dict[str, Path]


def find_scans(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """The scans the inputs name, each once, and notes on the files left out and why.

    A folder gives the scan files in it, else the DICOM series it holds. Files named like our results are left
    out of a folder; a file named on the command line is taken, unless the scan it is the result of is an
    input too (a shell pattern such as ``scans/*.nii.gz`` lists results beside their scans).
    """
    listed: list[tuple[Path, bool]] = []  # in the order given; True: named on the command line
    results: dict[Path, list[str]] = defaultdict(list)  # folder -> result files left out of it
    hidden: dict[Path, list[str]] = defaultdict(list)
    for path in inputs:
        if not path.exists():
            raise MedNCAError(f"input not found: {path}")
        if not path.is_dir():
            listed.append((path, True))
            continue
        found = []
        for child in sorted(path.iterdir()):
            if not (child.is_file() and child.name.lower().endswith(SCAN_SUFFIXES)):
                continue
            if child.name.startswith("."):  # a temporary file, or macOS's ._ companion of a copied scan
                hidden[path].append(child.name)
            elif result_of(child) is not None:
                results[path].append(child.name)
            else:
                found.append(child)
        if not found and not _has_dicom_series(path):
            raise MedNCAError(f"no scans found in {path} (looked for {LOOKED_FOR})" + _left_out(results[path]))
        listed.extend((p, False) for p in found or [path])
    bases = {(p.resolve().parent, _base(p).casefold()) for p, _ in listed}
    scans, seen = [], set()
    for path, named in listed:
        source = result_of(path) if named else None
        if source is not None and (path.resolve().parent, source.casefold()) in bases:
            results[path.parent].append(path.name)
        elif path.resolve() not in seen:
            seen.add(path.resolve())
            scans.append(path)
    notes = [f"{folder}: left out {_count(names, 'file')} named like mednca results (*_seg, *_std): "
             f"{_shown(names)}; name a file on its own to segment it" for folder, names in results.items() if names]
    notes += [f"{folder}: left out {_count(names, 'hidden file')}: {_shown(names)}" for folder, names in hidden.items()]
    return scans, notes


def plan(scans: list[Path], output: Path, kinds: tuple[str, ...]) -> list[Job]:
    """Where every result of every scan goes; refuses, before any work, a plan that would lose one.

    ``output`` is a folder, or (for one scan) a file name ending like a scan: then the segmentation is that
    file and any other result lies beside it, named after it (``one.nii.gz``, ``one_std.nii.gz``).
    """
    if names_a_file(output):
        if len(scans) != 1:
            raise MedNCAError(f"-o {output} names one file, but there are {len(scans)} scans: give a folder")
        stem, suffix = split_suffix(output.name)
        outputs = {k: output if k == "seg" else output.with_name(f"{stem}_{k}{suffix}") for k in kinds}
        jobs = [Job(scans[0], outputs)]
    else:
        names = distinct_names(scans)
        jobs = [Job(s, {k: output / f"{names[s]}_{k}.nii.gz" for k in kinds}) for s in scans]
    _refuse_clashes(jobs)
    return jobs


def batch_summary(outcomes: dict[str, int], jobs: int, report: str | os.PathLike | None) -> int:
    """A batch's last lines on stderr (where its results table is; how many scans were skipped or failed,
    when any were) and its exit status: 1 when a scan failed, else 0. ``outcomes`` counts "segmented",
    "skipped" and "failed" scans."""
    if report is not None:
        print(f"mednca: results table {report}", file=sys.stderr)
    if outcomes["failed"] or outcomes["skipped"]:
        parts = [f"{outcomes[k]} {k}" for k in ("segmented", "skipped", "failed") if outcomes[k]]
        print(f"mednca: {', '.join(parts)} of {jobs} scans" +
              (" (skipped: their results exist; --overwrite recomputes them)" if outcomes["skipped"] else ""),
              file=sys.stderr)
    return 1 if outcomes["failed"] else 0


def names_a_file(output: Path) -> bool:
    """Whether ``-o`` names a result file rather than a folder (an existing folder is always a folder)."""
    return output.name.lower().endswith(SCAN_SUFFIXES) and not output.is_dir()


def distinct_names(scans: list[Path]) -> dict[Path, str]:
    """A name for each scan's results: its file name without the extension, and where two scans share that
    name (ignoring case, as macOS and Windows do), their parent folders' names, else their file types."""
    names = {s: _base(s) for s in scans}
    groups: dict[str, list[Path]] = defaultdict(list)
    for scan, name in names.items():
        groups[name.casefold()].append(scan)
    for group in (g for g in groups.values() if len(g) > 1):
        depth = max(len(s.resolve().parent.parts) for s in group)
        ways = [(d, False) for d in range(1, depth)] + [(d, True) for d in range(depth)]
        for d, typed in ways:
            candidate = {s: _qualified(s, names[s], d, typed) for s in group}
            if _all_differ(candidate.values()):
                names.update(candidate)
                break
    return names


def result_of(path: Path) -> str | None:
    """The scan name a file named like one of our results belongs to (``a`` for ``a_seg.nii.gz``), else None."""
    base = _base(path)
    for kind in RESULT_KINDS:
        if base.lower().endswith(f"_{kind}") and len(base) > len(kind) + 1:
            return base[: -len(kind) - 1]
    return None


def split_suffix(name: str) -> tuple[str, str]:
    """``("case", ".nii.gz")`` for ``case.nii.gz``: the name and the scan extension it ends with (or "")."""
    for ext in (*SCAN_SUFFIXES, ".dcm"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return name, ""


def _base(path: Path) -> str:
    return split_suffix(path.name)[0]


def _qualified(scan: Path, name: str, depth: int, typed: bool) -> str:
    """``name`` after the last ``depth`` parent folders' names, and before the file type when ``typed``."""
    parents = scan.resolve().parent.parts[1:]  # without the root ("/" or "C:\\")
    parts = [*parents[len(parents) - depth :], name] if depth else [name]
    if typed:
        parts.append(split_suffix(scan.name)[1].lstrip(".").replace(".", "") or "dicom")
    return "_".join(parts)


def _all_differ(names) -> bool:
    names = [n.casefold() for n in names]
    return len(set(names)) == len(names)


def _refuse_clashes(jobs: list[Job]) -> None:
    inputs = {job.scan.resolve(): job.scan for job in jobs}
    taken: dict[str, tuple[Path, Path]] = {}
    for job in jobs:
        for path in job.outputs.values():
            resolved = path.resolve()
            if resolved in inputs or any(_same_file(resolved, scan) for scan in inputs):
                raise MedNCAError(f"the result of {job.scan} would be written over the input {path}: "
                                  "choose another output name or folder")
            key = str(resolved).casefold()
            if key in taken:
                other = taken[key][0]
                whose = f"{other} and {job.scan}" if other != job.scan else f"two results of {job.scan}"
                raise MedNCAError(f"{whose} would both be written to {path}: rename one, or segment them "
                                  "into separate folders")
            taken[key] = (job.scan, path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _has_dicom_series(folder: Path) -> bool:
    """Whether GDCM finds a DICOM series in ``folder``, without ITK's warning on the terminal when not."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _left_out(names: list[str]) -> str:
    if not names:
        return ""
    return f"; {_count(names, 'file')} named like mednca results were left out ({_shown(names)})"


def _count(names: list[str], what: str) -> str:
    return f"{len(names)} {what}" + ("" if len(names) == 1 else "s")


def _shown(names: list[str], most: int = 3) -> str:
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more} more" if more > 0 else "")

