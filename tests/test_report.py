"""The results table of ``mednca segment --report``: one row per scan with verdict, NQM, slices worth checking
and volumes in mL, kept across runs that skip finished scans."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from cli_support import AFFINE, tiny_model_file, write_scan

from mednca.cli import main

VOXEL_ML = abs(np.linalg.det(AFFINE[:3, :3])) / 1000


@pytest.fixture
def model_file(tmp_path):
    return tiny_model_file(tmp_path / "tiny.safetensors", classes=("anterior", "posterior"))


def read_rows(path):
    with open(path, newline="") as f:
        return {row["scan"].rsplit("/", 1)[-1]: row for row in csv.DictReader(f)}


def test_each_scan_gets_a_row_with_verdict_slices_and_volumes(model_file, scans, tmp_path, capsys, one_thread):
    out, table = tmp_path / "out", tmp_path / "results.csv"
    assert main(["segment", str(scans), "-o", str(out), "--model", str(model_file), "--quality", "3",
                 "--report", str(table)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("verdict: ") == 2 and "mL" in printed
    rows = read_rows(table)
    assert set(rows) == {"a.nii.gz", "b.nii.gz"}
    row = rows["a.nii.gz"]
    assert row["status"] == "segmented" and row["verdict"] in ("ok", "check", "fail")
    assert float(row["nqm"]) >= 0 and row["plane"] in ("axial", "coronal", "sagittal")
    labels = np.asarray(nib.load(out / "a_seg.nii.gz").dataobj)
    for k, name in enumerate(("anterior", "posterior"), start=1):
        assert float(row[f"volume_ml_{name}"]) == pytest.approx((labels == k).sum() * VOXEL_ML, abs=1e-4)
        assert float(row[f"volume_ml_{name}_sd"]) >= 0
        assert float(row[f"volume_ml_{name}_low"]) <= float(row[f"volume_ml_{name}_high"])
    assert float(row["volume_ml_whole"]) == pytest.approx((labels > 0).sum() * VOXEL_ML, abs=1e-4)
    flagged = [int(s) for s in row["flagged_slices"].split()]
    assert all(0 <= s < max(labels.shape) for s in flagged)


def test_a_plain_segmentation_reports_volumes_but_no_verdict(model_file, scans, tmp_path, one_thread):
    table = tmp_path / "results.json"
    assert main(["segment", str(scans / "a.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(model_file),
                 "--report", str(table)]) == 0
    (row,) = json.loads(table.read_text())
    assert row["verdict"] == "not assessed" and row["nqm"] == "" and "volume_ml_whole" in row


def test_failures_are_rows_and_a_rerun_keeps_the_rows_of_skipped_scans(model_file, scans, tmp_path, one_thread):
    out, table = tmp_path / "out", tmp_path / "results.csv"
    (scans / "broken.nii.gz").write_bytes(b"not a scan")
    args = ["segment", str(scans), "-o", str(out), "--model", str(model_file), "--report", str(table)]
    assert main(args) == 1
    first = read_rows(table)
    assert first["broken.nii.gz"]["status"] == "failed" and "broken.nii.gz" in first["broken.nii.gz"]["error"]
    (scans / "broken.nii.gz").unlink()
    write_scan(scans / "c.nii.gz", 7)
    assert main(args) == 0  # a and b are skipped (their results exist), c is new
    second = read_rows(table)
    assert set(second) == {"a.nii.gz", "b.nii.gz", "broken.nii.gz", "c.nii.gz"}
    assert second["a.nii.gz"] == first["a.nii.gz"] and second["c.nii.gz"]["status"] == "segmented"


def test_a_table_that_is_not_ours_is_refused_before_any_work(model_file, scans, tmp_path, capsys):
    table = tmp_path / "notes.csv"
    table.write_text("patient,comment\nx,y\n")
    assert main(["segment", str(scans), "-o", str(tmp_path / "out"), "--model", str(model_file),
                 "--report", str(table)]) == 1
    assert "not a mednca results table" in capsys.readouterr().err
    assert not (tmp_path / "out" / "a_seg.nii.gz").exists() and table.read_text().startswith("patient")
