"""``mednca finetune``: adapts a model from the annotated slices of a label file, prints the estimate, writes
a model file that records its base, slices and estimate only when it is expected to be better (or with
--force), and refuses label files that do not fit with one line, before any training."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from training_support import TINY, toy_case

from mednca.checkpoint import load_model_file, save_model
from mednca.cli import main
from mednca.preprocess import Preprocessing
from mednca.training import new_model

AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])
SHAPE = (20, 20, 10)
PAINTED = [1, 4, 7]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models, a shared machine: every test here runs torch on one thread."""


@pytest.fixture
def files(tmp_path):
    """A tiny two-class model (untrained), a toy scan and a label file annotating three of its slices."""
    model = save_model(new_model(TINY, Preprocessing(), seed=0), tmp_path / "tiny.safetensors")
    image, labels = toy_case(7, SHAPE)
    sparse = np.zeros_like(labels.array)
    sparse[..., PAINTED] = labels.array[..., PAINTED]
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image.array, AFFINE), scan)
    label_file = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(sparse, AFFINE), label_file)
    return model, scan, label_file, sparse


def finetune(model, scan, labels, output, *extra) -> int:
    return main(["finetune", str(scan), str(labels), "-o", str(output), "--model", str(model), "--threads", "1",
                 *map(str, extra)])


def test_writes_an_adapted_model_recording_base_slices_and_estimate(files, tmp_path, capsys):
    model, scan, labels, _ = files
    output = tmp_path / "adapted.safetensors"
    assert finetune(model, scan, labels, output, "--iterations", 60, "--lr", 2e-2) == 0
    out = capsys.readouterr().out
    assert "expected Dice on the slices it did not train on:" in out and "use the adapted model" in out
    assert f"wrote {output}" in out
    record = load_model_file(output).provenance["finetune"]
    assert record["base_model"] == str(model) and record["slices"] == PAINTED
    assert record["recommended"] is True
    assert record["estimate_after"] > record["estimate_before"]


def test_a_model_not_expected_to_be_better_is_written_only_with_force(files, tmp_path, capsys):
    model, scan, labels, _ = files
    output = tmp_path / "adapted.safetensors"
    # one tiny step: the adapted model is the base model, so it cannot be expected to be better
    assert finetune(model, scan, labels, output, "--iterations", 1, "--lr", 1e-6) == 1
    captured = capsys.readouterr()
    assert "keep the current model" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        f"mednca: error: {output} was not written: the adapted model is not expected to be better "
        "(--force writes it anyway)")
    assert not output.exists()
    assert finetune(model, scan, labels, output, "--iterations", 1, "--lr", 1e-6, "--force") == 0
    assert load_model_file(output).provenance["finetune"]["recommended"] is False


def bad_labels(tmp_path, files, kind):
    _, _, _, sparse = files
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "shape":
        nib.save(nib.Nifti1Image(sparse[:-2], AFFINE), path)
    elif kind == "geometry":
        nib.save(nib.Nifti1Image(sparse, np.diag([2.0, 1.0, 1.5, 1.0])), path)
    elif kind == "empty":
        nib.save(nib.Nifti1Image(np.zeros_like(sparse), AFFINE), path)
    elif kind == "class":
        other = sparse.copy()
        other[other == 2] = 3
        nib.save(nib.Nifti1Image(other, AFFINE), path)
    elif kind == "fraction":
        nib.save(nib.Nifti1Image(sparse.astype(np.float32) * 0.5, AFFINE), path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("shape", "the labels have shape (18, 20, 10) but the image has shape (20, 20, 10)"),
        ("geometry", "the labels lie on another grid than the image (their affines differ)"),
        ("empty", "no annotated slice along axis 2 (axial slices, the plane the model segments)"),
        ("class", "the labels hold class 3, but the model segments only 2 classes ('a', 'b')"),
        ("fraction", "the labels hold fractional values"),
    ],
)
def test_label_files_that_do_not_fit_are_refused_in_one_line(files, tmp_path, capsys, kind, message):
    model, scan, _, _ = files
    output = tmp_path / "adapted.safetensors"
    assert finetune(model, scan, bad_labels(tmp_path, files, kind), output) == 1
    err = capsys.readouterr().err
    assert err.startswith("mednca: error: ") and message in err
    assert err.strip().count("\n") == 0  # refused before any training, so no progress bar either
    assert not output.exists()


def test_slices_outside_the_scan_and_an_existing_output_are_refused(files, tmp_path, capsys):
    model, scan, labels, _ = files
    output = tmp_path / "adapted.safetensors"
    assert finetune(model, scan, labels, output, "--slices", 3, 12) == 1
    assert "slices [12] lie outside the volume (axis 2 has 10 slices)" in capsys.readouterr().err
    output.write_bytes(b"keep me")
    assert finetune(model, scan, labels, output) == 1
    assert "already exists" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"
