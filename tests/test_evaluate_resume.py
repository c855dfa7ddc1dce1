"""Results tables a long run can lean on: ``mednca evaluate --report`` keeps every case's scores as it finishes,
a re-run scores only the cases missing (after Ctrl-C, in this process or on a LocalCluster, the table ends
with the scores of an uninterrupted run), a case that fails is a row with its error, a table of another
model or settings is refused; ``--report FILE.parquet`` (segment and evaluate) writes the CSV's columns
and values as Parquet, atomically, and without pyarrow is refused in one line before any work."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from cli_support import make_task, tiny_model_file, write_scan

from mednca.cli import main
from mednca.errors import MedNCAError
from mednca.report import ReportFile

needs_dask = pytest.mark.skipif(find_spec("distributed") is None,
                                reason="Dask distributed is not installed (pip install 'napari-nca[cluster]')")
needs_pyarrow = pytest.mark.skipif(find_spec("pyarrow") is None,
                                   reason="pyarrow is not installed (pip install 'napari-nca[cluster]')")
WAIT = 600  # seconds: generous, for a loaded 2-core machine; a hang fails instead of stalling the suite
REAL_CASES = 5
SCORES = ("status", "nqm", "verdict")  # with every dice_ column: what scoring a case decides


def evaluate(*args) -> int:
    return main(["evaluate", *map(str, args)])


def rows_of(path: Path) -> dict[tuple[str, str], dict]:
    """A results table by (case, artefact), whatever its format, as the text a CSV holds."""
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        records = [{k: _as_text(v) for k, v in r.items()} for r in frame.to_dict("records")]
    elif path.suffix == ".json":
        records = [{k: _as_text(v) for k, v in r.items()} for r in json.loads(path.read_text())]
    else:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    return {(r["case"], r["artefact"]): r for r in records}


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def scores(rows: dict) -> dict:
    return {key: {c: v for c, v in row.items() if c in SCORES or c.startswith("dice_")} for key, row in rows.items()}


def without_nqm(scores: dict) -> dict:
    return {key: {c: v for c, v in row.items() if c != "nqm"} for key, row in scores.items()}


def break_images(task: Path, cases) -> None:
    """Make cases unreadable: a run that still gives their scores did not compute them again."""
    for case in cases:
        (task / "imagesTr" / f"{case}.nii.gz").write_bytes(b"not a scan any more")


# ------------------------------------------------------------------------------------- real scans, Ctrl-C


@pytest.fixture(scope="module")
def real_task(hippocampus_dir, tmp_path_factory):
    """A Decathlon folder of the smallest real hippocampus cases (seconds each); a fresh copy per call."""
    index = json.loads((hippocampus_dir / "dataset.json").read_text())
    smallest = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"), key=lambda p: p.stat().st_size)
    names = [p.name for p in smallest[:REAL_CASES]]

    def copy() -> Path:
        task = tmp_path_factory.mktemp("task")
        for sub in ("imagesTr", "labelsTr"):
            (task / sub).mkdir()
            for name in names:
                shutil.copy(hippocampus_dir / sub / name, task / sub / name)
        index["training"] = [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names]
        (task / "dataset.json").write_text(json.dumps(index))
        return task

    return copy


@pytest.fixture(scope="module")
def uninterrupted(real_task, tmp_path_factory) -> dict:
    """The scores of one uninterrupted in-process run of the shipped model, with quality maps."""
    path = tmp_path_factory.mktemp("reference") / "scores.csv"
    assert evaluate("hippocampus", real_task(), "--cases", "all", "--quality", 2, "--threads", 1,
                    "--report", path) == 0
    rows = rows_of(path)
    assert len(rows) == REAL_CASES and {r["status"] for r in rows.values()} == {"scored"}
    assert all(r["verdict"] in ("ok", "check", "fail") and float(r["nqm"]) > 0 for r in rows.values())
    return scores(rows)


def interrupt(command: list[str], table: Path) -> tuple[int, str]:
    """Run ``mednca COMMAND`` as a user would, press Ctrl-C once the table holds a case; exit status, stderr."""
    run = subprocess.Popen([sys.executable, "-m", "mednca.cli", *command], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT
    while run.poll() is None and time.monotonic() < deadline and not (table.exists() and rows_of(table)):
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the command and any worker processes
    _, stderr = run.communicate(timeout=WAIT)
    return run.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", [
    pytest.param(["--threads", "1"], id="in-process"),
    pytest.param(["--workers", "2"], id="local-cluster", marks=needs_dask),
])
def test_ctrl_c_keeps_the_scores_and_the_rerun_scores_only_the_missing_cases(where, real_task, uninterrupted,
                                                                             tmp_path, capsys):
    task, table = real_task(), tmp_path / "scores.csv"
    command = ["evaluate", "hippocampus", str(task), "--cases", "all", "--quality", "2", "--report", str(table)]
    code, stderr = interrupt([*command, *where], table)
    assert code == 130, stderr
    assert "the scores so far are in" in stderr and "running the same command again scores the rest" in stderr
    kept = rows_of(table)
    assert 1 <= len(kept) < REAL_CASES, "the run was to be interrupted midway"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written table
    if "--workers" in where:
        assert all(r["worker"].startswith("tcp://127.0.0.1:") for r in kept.values())

    break_images(task, [case for case, _ in kept])
    assert main([*command, "--threads", "1"]) == 0  # only the cases missing are scored: the others are broken now
    assert f"{len(kept)} of {REAL_CASES} cases already scored" in capsys.readouterr().err
    final = rows_of(table)
    assert without_nqm(scores(final)) == without_nqm(uninterrupted)
    for key, row in uninterrupted.items():  # a float32 sum whose last bits follow memory layout, not the case
        assert float(final[key]["nqm"]) == pytest.approx(float(row["nqm"]), rel=1e-6)
    assert {key: final[key] for key in kept} == kept  # rows kept as they were (worker and seconds included)


# ---------------------------------------------------------------------------------------- small toy cases


@pytest.fixture
def toy(tmp_path):
    task = make_task(tmp_path / "task", n_cases=3)
    model = tiny_model_file(tmp_path / "two.safetensors", classes=("A", "B"))
    return task, model


def test_a_case_that_fails_is_a_row_with_its_error_and_the_rerun_scores_only_it(toy, tmp_path, capsys):
    task, model = toy
    table = tmp_path / "scores.json"
    image = task / "imagesTr" / "toy_002.nii.gz"
    good = image.read_bytes()
    image.write_bytes(b"broken")
    command = [model, task, "--cases", "all", "--seed", 3, "--report", table, "--perturb", "noise"]
    assert evaluate(*command) == 1
    rows = rows_of(table)
    assert rows.keys() == {(c, a) for c in ("toy_001", "toy_002", "toy_003") for a in ("none", "noise")}
    for artefact in ("none", "noise"):
        failed = rows[("toy_002", artefact)]
        assert failed["status"] == "failed" and "toy_002.nii.gz is not a readable NIfTI file" in failed["error"]
        assert failed["dice_whole"] == ""
    assert all(r["status"] == "scored" and r["error"] == "" for k, r in rows.items() if k[0] != "toy_002")
    assert "toy_002: FAILED" in capsys.readouterr().out

    image.write_bytes(good)
    break_images(task, ["toy_001", "toy_003"])  # scored already: the re-run must not read them
    assert evaluate(*command) == 0
    assert "2 of 3 cases already scored" in capsys.readouterr().err
    after = rows_of(table)
    assert after[("toy_002", "none")]["status"] == after[("toy_002", "noise")]["status"] == "scored"
    assert {k: r for k, r in after.items() if k[0] != "toy_002"} == {k: r for k, r in rows.items() if k[0] != "toy_002"}


def test_a_table_of_another_model_or_settings_is_refused_untouched(toy, tmp_path, capsys):
    task, model = toy
    table = tmp_path / "scores.csv"
    assert evaluate(model, task, "--cases", "toy_001", "--seed", 1, "--report", table) == 0
    before = table.read_bytes()
    assert evaluate(model, task, "--cases", "toy_001", "--seed", 2, "--report", table) == 1
    err = capsys.readouterr().err
    assert "mednca: error: " in err
    assert "holds scores of another model or other settings (--seed 1 there, 2 here)" in err
    other = tiny_model_file(tmp_path / "one.safetensors")
    assert evaluate(other, task, "--cases", "toy_001", "--seed", 1, "--report", table) == 1
    assert "(model digest " in capsys.readouterr().err
    assert table.read_bytes() == before
    copy = shutil.copy(model, tmp_path / "renamed.safetensors")  # the same model under another name
    assert evaluate(copy, task, "--cases", "toy_001", "--seed", 1, "--report", table) == 0
    assert "1 of 1 cases already scored" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- Parquet


@needs_pyarrow
def test_evaluate_parquet_table_has_the_csv_columns_and_values(toy, tmp_path):
    task, model = toy
    for name in ("scores.csv", "scores.parquet"):
        assert evaluate(model, task, "--cases", "all", "--quality", 2, "--threads", 1, "--report", tmp_path / name) == 0
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "scores.parquet").names == next(csv.reader(open(tmp_path / "scores.csv")))
    from_csv, from_parquet = rows_of(tmp_path / "scores.csv"), rows_of(tmp_path / "scores.parquet")
    assert scores(from_parquet) == scores(from_csv) and len(from_csv) == 3
    types = {f.name: str(f.type) for f in pq.read_schema(tmp_path / "scores.parquet")}
    assert types["dice_A"] == types["nqm"] == "double" and types["seed"] == "int64" and types["case"] == "string"


@needs_pyarrow
def test_segment_parquet_report_has_the_csv_columns_and_values(tmp_path):
    model = tiny_model_file(tmp_path / "tiny.safetensors")
    for i in range(2):
        write_scan(tmp_path / "scans" / f"s{i}.nii.gz", seed=i)
    (tmp_path / "scans" / "corrupt.nii.gz").write_bytes(b"not a scan")
    common = ["segment", str(tmp_path / "scans"), "-o", str(tmp_path / "out"), "--model", str(model), "--quality", "2",
              "--overwrite"]
    assert main([*common, "--report", str(tmp_path / "r.csv")]) == 1  # the corrupt scan
    assert main([*common, "--report", str(tmp_path / "r.parquet")]) == 1
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "r.parquet")
    with open(tmp_path / "r.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    assert list(frame.columns) == list(expected[0])
    got = {r["scan"]: {k: _as_text(v) for k, v in r.items()} for r in frame.to_dict("records")}
    assert set(got) == {r["scan"] for r in expected}
    for row in expected:
        parquet = got[row["scan"]]
        for column, text in row.items():
            if column == "seconds":
                continue
            if column.startswith("volume_ml_") or column == "nqm":
                assert (parquet[column] == "") == (text == "") and float(parquet[column] or 0) == float(text or 0)
            else:
                assert parquet[column] == text, column


@needs_pyarrow
def test_parquet_keeps_numbers_as_numbers_and_slice_lists_as_text(tmp_path):
    row = {"scan": "a.nii.gz", "status": "segmented", "nqm": "0.25", "flagged_slices": "12", "volume_ml_whole": 3.5,
           "seconds": "", "seed": "4"}  # text, as a CSV gives it back, or numbers, as a run makes them
    ReportFile(tmp_path / "r.parquet").add(row)
    back = ReportFile(tmp_path / "r.parquet").rows[("a.nii.gz",)]
    assert back["flagged_slices"] == "12" and back["nqm"] == 0.25 and back["volume_ml_whole"] == 3.5
    assert back["seed"] == 4 and back["seconds"] == "" and back["error"] == ""


@needs_pyarrow
def test_a_parquet_write_that_fails_leaves_the_previous_table(tmp_path, monkeypatch):
    table = ReportFile(tmp_path / "r.parquet")
    table.add({"scan": "a.nii.gz", "status": "segmented", "nqm": 0.25})
    import pyarrow.parquet as pq

    def fail_midway(data, where):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", fail_midway)
    with pytest.raises(MedNCAError, match="r.parquet: the results table could not be written"):
        table.add({"scan": "b.nii.gz", "status": "failed", "error": "unreadable"})
    monkeypatch.undo()
    assert list(ReportFile(tmp_path / "r.parquet").rows) == [("a.nii.gz",)]
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # the staged file is gone


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_parquet_without_pyarrow_is_refused_in_one_line_before_any_work(command, toy, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    task, model = toy
    if command == "segment":
        write_scan(tmp_path / "scans" / "s0.nii.gz")
        args = ["segment", str(tmp_path / "scans"), "-o", str(tmp_path / "out"), "--model", str(model)]
    else:
        args = ["evaluate", str(model), str(task), "--cases", "all"]
    assert main([*args, "--report", str(tmp_path / "r.parquet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mednca: error: r.parquet: writing Parquet needs the pyarrow package (pip install pyarrow, or "
                   "pip install 'napari-nca[cluster]'); or give a .csv or .json file"]
    assert not (tmp_path / "r.parquet").exists() and not list(tmp_path.glob("out/*_seg.nii.gz"))
