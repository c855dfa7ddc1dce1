"""The ``mednca`` command line: one line of result per scan, clear one-line errors, exit codes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from mednca.checkpoint import save_model
from mednca.cli import main
from mednca.model import MedNCA, NCAConfig


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = MedNCA(NCAConfig(channels=8, hidden=16, steps=(2, 3), input_size=(16, 16)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return save_model(model, tmp_path / "tiny.safetensors")


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    affine = np.array([[0, 0, 1.5, -20], [-1.1, 0, 0, 30], [0, 0.9, 0, 5], [0, 0, 0, 1]], float)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.normal(50, 10, (12, 14, 9)).astype(np.float32), affine), folder / f"{name}.nii.gz")
    return folder, affine


def test_segment_a_folder_writes_one_label_file_per_scan(model_file, scans, tmp_path, capsys):
    folder, affine = scans
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(model_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("->" in line for line in lines)
    for name in ("a", "b"):
        seg = nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == (12, 14, 9)
        np.testing.assert_allclose(seg.affine, affine)


def test_segment_with_quality_writes_the_std_map_and_reports_nqm(model_file, scans, tmp_path, capsys):
    folder, _ = scans
    out = tmp_path / "one.nii.gz"
    assert main(["segment", str(folder / "a.nii.gz"), "-o", str(out), "--model", str(model_file),
                 "--quality", "3", "--seed", "2"]) == 0
    assert "NQM" in capsys.readouterr().out
    assert out.exists() and (tmp_path / "a_std.nii.gz").exists()


def test_a_bad_scan_fails_alone_with_a_clear_message(model_file, scans, tmp_path, capsys):
    folder, _ = scans
    (folder / "broken.nii.gz").write_bytes(b"not a scan")
    assert main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_file)]) == 1
    captured = capsys.readouterr()
    assert "broken.nii.gz: FAILED" in captured.out
    assert (tmp_path / "out" / "a_seg.nii.gz").exists()
    assert "Traceback" not in captured.err


def test_unknown_model_and_missing_input_exit_1(model_file, tmp_path, capsys):
    assert main(["segment", str(tmp_path / "none.nii.gz"), "-o", str(tmp_path), "--model", str(model_file)]) == 1
    assert "input not found" in capsys.readouterr().err
    assert main(["info", "no-such-model"]) == 1
    assert "no model named" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment"])
    assert exc.value.code == 2


def test_import_reference_then_info_and_models(reference_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDNCA_MODELS_DIR", str(tmp_path / "models"))
    target = tmp_path / "models" / "authors.safetensors"
    assert main(["import-reference", str(reference_dir), "-o", str(target)]) == 0
    assert "70016 parameters" in capsys.readouterr().out
    assert main(["info", "authors"]) == 0
    assert '"hidden": 128' in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "authors [user]" in capsys.readouterr().out
