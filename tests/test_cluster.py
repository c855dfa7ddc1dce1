"""``mednca segment|evaluate --workers N / --scheduler ADDRESS``: a cohort on Dask gives the in-process run's
labels and table, loses no scan to a worker killed mid-scan or to Ctrl-C, resumes with only what is missing,
and reports a corrupt scan while the others finish. Real clusters throughout: a LocalCluster, and a scheduler
with workers started as separate processes on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from cli_support import make_task, tiny_model_file, write_scan

from mednca.cli import main
from mednca.volume import read_volume

pytestmark = pytest.mark.slow
needs_dask = pytest.mark.skipif(find_spec("distributed") is None,
                                reason="Dask distributed is not installed (pip install 'napari-nca[cluster]')")
WAIT = 600  # seconds: generous, for a loaded 2-core machine; a hang fails instead of stalling the suite


@pytest.fixture
def scans(tmp_path):
    """Small synthetic scans and a corrupt one."""
    folder = tmp_path / "scans"
    for i in range(4):
        write_scan(folder / f"s{i}.nii.gz", seed=i)
    (folder / "corrupt.nii.gz").write_bytes(b"not a scan")
    return folder


@pytest.fixture
def real_scans(tmp_path, hippocampus_dir):
    """A folder of copies of the smallest real hippocampus MRIs (the shipped model takes seconds on each)."""

    def copy(n: int) -> Path:
        folder = tmp_path / "real"
        folder.mkdir()
        smallest = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"), key=lambda p: p.stat().st_size)
        for path in smallest[:n]:
            shutil.copy(path, folder)
        return folder

    return copy


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A scheduler and two single-threaded workers, each its own process (no nanny: a killed worker stays
    dead), started in a folder of their own: the command must send absolute paths."""
    if find_spec("distributed") is None:
        pytest.skip("Dask distributed is not installed (pip install 'napari-nca[cluster]')")
    from distributed import Client

    folder = tmp_path_factory.mktemp("cluster")
    info = folder / "scheduler.json"
    quiet = dict(cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen(dask("scheduler", info, "--host", "127.0.0.1", "--port", 0), **quiet)]
    try:
        procs += [subprocess.Popen(dask("worker", info, "--nthreads", 1, "--no-nanny", "--name", f"w{i}"), **quiet)
                  for i in range(2)]
        deadline = time.monotonic() + WAIT
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        with Client(address, timeout=WAIT) as client:
            client.wait_for_workers(2, timeout=WAIT)
            yield address, client, dict(zip(("w0", "w1"), procs[1:], strict=True))
    finally:
        for proc in procs:  # nothing of theirs to keep: a worker may linger for a minute on a polite request
            proc.kill()
            proc.wait()


def dask(command: str, scheduler_file: Path, *args) -> list[str]:
    """The ``dask scheduler`` / ``dask worker`` command line, run by this Python, without a dashboard."""
    return [sys.executable, "-m", f"distributed.cli.dask_{command}", "--no-dashboard", "--scheduler-file",
            str(scheduler_file), *map(str, args)]


def segment(*args) -> int:
    return main(["segment", *map(str, args)])


def table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["scan"]: row for row in csv.DictReader(f)}


def labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_volume(p).array for p in sorted(folder.glob("*_seg.nii.gz"))}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- same results


@needs_dask
def test_local_cluster_gives_the_in_process_labels_and_table_and_reports_a_corrupt_scan(model_file, scans,
                                                                                        tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.chdir(tmp_path)  # paths as a user types them: relative
    common = ("scans", "--model", model_file, "--seed", 7)
    assert segment(*common, "-o", "here", "--threads", 1, "--report", "here/table.csv") == 1
    assert segment(*common, "-o", "there", "--workers", 2, "--report", "there/table.csv") == 1
    out = capsys.readouterr()
    assert "1 failed" in out.err and "scans/corrupt.nii.gz: FAILED: corrupt.nii.gz is not a readable" in out.out
    assert "scans/s0.nii.gz -> there/s0_seg.nii.gz" in out.out
    expected, got = labels(tmp_path / "here"), labels(tmp_path / "there")
    assert sorted(got) == [f"s{i}_seg.nii.gz" for i in range(4)]
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    rows_here, rows_there = table(tmp_path / "here/table.csv"), table(tmp_path / "there/table.csv")
    assert rows_there.keys() == rows_here.keys() == {f"scans/{n}.nii.gz" for n in ("s0", "s1", "s2", "s3", "corrupt")}
    for scan, row in rows_there.items():
        assert row.pop("worker").startswith("tcp://127.0.0.1:")
        assert row.pop("output") == rows_here[scan].pop("output").replace("here/", "there/")
        assert {**row, "seconds": ""} == {**rows_here[scan], "seconds": ""}
    corrupt = rows_there["scans/corrupt.nii.gz"]
    assert corrupt["status"] == "failed" and "not a readable NIfTI file" in corrupt["error"]


@needs_dask
def test_separate_scheduler_and_workers_give_the_in_process_labels(scheduler, model_file, scans, tmp_path,
                                                                   monkeypatch):
    address, client, _ = scheduler
    monkeypatch.chdir(tmp_path)  # relative paths; the workers run in another folder
    common = ("scans", "--model", model_file, "--seed", 3, "--quality", 2)
    assert segment(*common, "-o", "here", "--threads", 1) == 1
    assert segment(*common, "-o", "there", "--scheduler", address, "--report", "there/t.json") == 1
    expected, got = labels(tmp_path / "here"), labels(tmp_path / "there")
    assert len(got) == 4 and got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    rows = json.loads((tmp_path / "there/t.json").read_text())
    assert sorted(r["scan"] for r in rows) == ["scans/corrupt.nii.gz", *(f"scans/s{i}.nii.gz" for i in range(4))]
    assert {r["status"] for r in rows} == {"segmented", "failed"}
    assert {r["std_map"] for r in rows if r["status"] == "segmented"} == {f"there/s{i}_std.nii.gz" for i in range(4)}
    assert {r["worker"] for r in rows} <= set(client.scheduler_info()["workers"])


@needs_dask
def test_evaluate_on_the_cluster_scores_as_in_process(scheduler, tmp_path):
    address, _, _ = scheduler
    task = make_task(tmp_path / "task", n_cases=3)
    model = tiny_model_file(tmp_path / "two.safetensors", classes=("A", "B"))
    (task / "imagesTr" / "toy_002.nii.gz").write_bytes(b"broken")
    runs, tables = {}, {}
    for name, extra in (("here", ["--threads", "1"]), ("there", ["--scheduler", address])):
        rc = main(["evaluate", str(model), str(task), "--cases", "all", "--seed", "5", "--csv",
                   str(tmp_path / f"{name}.csv"), "--report", str(tmp_path / f"{name}_table.csv"), *extra])
        assert rc == 1  # toy_002 cannot be read, and is reported
        with open(tmp_path / f"{name}.csv", newline="") as f:
            runs[name] = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
        with open(tmp_path / f"{name}_table.csv", newline="") as f:
            tables[name] = {row["case"]: row for row in csv.DictReader(f)}
    assert [row["case"] for row in runs["there"]] == ["toy_001", "toy_003"]
    assert runs["there"] == runs["here"]
    assert tables["there"].keys() == tables["here"].keys() == {"toy_001", "toy_002", "toy_003"}
    for case, row in tables["there"].items():  # the table's rows too, with the worker that scored each
        assert row.pop("worker").startswith("tcp://127.0.0.1:") and tables["here"][case].pop("worker") == ""
        assert {**row, "seconds": ""} == {**tables["here"][case], "seconds": ""}
    failed = tables["there"]["toy_002"]
    assert failed["status"] == "failed" and failed["error"].startswith("toy_002.nii.gz is not a readable NIfTI")


def test_a_cluster_without_dask_installed_is_refused_with_what_to_install(model_file, scans, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "mednca.cluster", raising=False)
    assert segment(scans, "-o", tmp_path / "out", "--model", model_file, "--workers", 2) == 1
    assert "pip install 'napari-nca[cluster]'" in capsys.readouterr().err
    assert not list(tmp_path.glob("out/*_seg.nii.gz"))


# --------------------------------------------------------------------------------- nothing lost, resumable


@needs_dask
def test_ctrl_c_keeps_what_finished_and_the_rerun_segments_only_what_is_missing(scheduler, real_scans, tmp_path,
                                                                               capsys):
    scans, out = real_scans(5), tmp_path / "out"
    command = ["segment", str(scans), "-o", str(out), "--report", str(out / "table.csv")]
    run = subprocess.Popen([sys.executable, "-m", "mednca.cli", *command, "--workers", "2"], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT
    while not list(out.glob("*_seg.nii.gz")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the command and its worker processes
    stdout, stderr = run.communicate(timeout=WAIT)
    assert run.returncode == 130, stderr
    assert "running the same command again does the rest" in stderr
    done = labels(out)
    assert 1 <= len(done) < 5, "the run was to be interrupted midway"
    assert leftovers(out) == []  # no staging folder, no half-written file
    assert {Path(r["output"]).name for r in table(out / "table.csv").values()} == set(done)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz")}

    assert main([*command, "--scheduler", scheduler[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("skipped, its results exist" in line for line in lines) == len(done)
    assert sum(" -> " in line for line in lines) == 5 - len(done)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.nii.gz") if p.name in before} == before
    rows = table(out / "table.csv")
    assert len(rows) == 5 and {r["status"] for r in rows.values()} == {"segmented"}  # earlier rows kept
    for scan, row in rows.items():
        assert read_volume(row["output"]).shape == read_volume(scan).shape


@needs_dask
def test_a_scan_that_starts_after_ctrl_c_writes_nothing(scheduler, model_file, scans, tmp_path):
    """Between Ctrl-C and the cancel reaching the scheduler a worker may start another scan; it must find the
    run stopped and write nothing, or its result would lack its row in the table."""
    from argparse import Namespace

    from distributed import Event

    from mednca.batch import plan
    from mednca.checkpoint import load_model_file
    from mednca.cluster import segment_scan, shared_model

    _, client, _ = scheduler
    [job] = plan([scans / "s0.nii.gz"], tmp_path / "out", ("seg",))
    job.outputs["seg"].parent.mkdir()
    options = Namespace(overwrite=False, plane=None, seed=0, quality=0)
    with shared_model(client, load_model_file(model_file)) as name:
        stop = f"mednca-stop-test-{tmp_path.name}"
        assert client.submit(segment_scan, name, job, options, 1, stop, pure=False).result() is not None
        job.outputs["seg"].unlink()
        Event(stop, client=client).set()
        assert client.submit(segment_scan, name, job, options, 1, stop, pure=False).result() is None
    assert not job.outputs["seg"].exists()


@needs_dask
def test_a_worker_killed_mid_scan_loses_no_scan_and_leaves_no_partial_file(scheduler, real_scans, tmp_path):
    """Runs last: it kills one of the module's two workers."""
    address, client, procs = scheduler
    scans, out = real_scans(6), tmp_path / "out"
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(main, ["segment", str(scans), "-o", str(out), "--scheduler", address,
                                 "--report", str(out / "table.csv")])
        deadline = time.monotonic() + WAIT
        while not list(out.glob("*_seg.nii.gz")) and not run.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        victim, survivor = names["w0"], names["w1"]
        in_flight = [key for key in client.processing()[victim] if "mednca-segment" in str(key)]
        assert in_flight, "the killed worker had a scan in hand"
        procs["w0"].send_signal(signal.SIGKILL)
        assert run.result(timeout=WAIT) == 0
    procs["w0"].wait(timeout=WAIT)
    rows = table(out / "table.csv")
    assert len(rows) == 6 and {r["status"] for r in rows.values()} == {"segmented"}
    ordered = sorted(rows)  # the tasks are numbered in the order of the folder's scans
    retried = [ordered[int(str(key).rsplit("-", 1)[1])] for key in in_flight]
    assert any(rows[scan]["worker"] == survivor for scan in retried)
    assert leftovers(out) == []
    for scan, row in rows.items():
        assert read_volume(row["output"]).shape == read_volume(scan).shape
