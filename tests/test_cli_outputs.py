"""``mednca segment`` never loses or mixes up results: its own results are never taken for scans, a rerun
resumes, inputs that would share a result get distinct names, and what cannot work is refused before the
work; file-system and memory failures cost one scan, with one line saying why, and leave no litter."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
import pytest
from cli_support import AFFINE, SHAPE, write_scan

from mednca import cli, staging, volume
from mednca.cli import main


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models, a shared machine: every test here runs torch on one thread."""


def segment(model_file, *args) -> int:
    return main(["segment", *map(str, args), "--model", str(model_file)])


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------- our results as inputs


def test_a_folder_segmented_into_itself_is_not_segmented_again(model_file, scans, capsys):
    assert segment(model_file, scans, "-o", scans) == 0
    capsys.readouterr()
    assert segment(model_file, scans, "-o", scans, "--quality", "2", "--overwrite") == 0
    captured = capsys.readouterr()
    assert names(scans) == ["a.nii.gz", "a_seg.nii.gz", "a_std.nii.gz", "b.nii.gz", "b_seg.nii.gz", "b_std.nii.gz"]
    assert "left out 2 files named like mednca results (*_seg, *_std): a_seg.nii.gz, b_seg.nii.gz" in captured.err
    assert sum(" -> " in line for line in captured.out.splitlines()) == 2  # one result line per scan


def test_results_listed_by_a_shell_pattern_are_left_out_but_a_file_named_alone_is_segmented(model_file, scans,
                                                                                             tmp_path, capsys):
    assert segment(model_file, scans, "-o", scans) == 0
    listed = sorted(scans.glob("*.nii.gz"))  # what `mednca segment scans/*.nii.gz` receives
    assert segment(model_file, *listed, "-o", tmp_path / "out") == 0
    assert names(tmp_path / "out") == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert "left out 2 files" in capsys.readouterr().err
    alone = write_scan(tmp_path / "brain_std.nii.gz")  # e.g. a scan in a standard space
    assert segment(model_file, alone, "-o", tmp_path / "out") == 0
    assert (tmp_path / "out" / "brain_std_seg.nii.gz").exists()


# -------------------------------------------------------------------------------------------- resuming


def test_a_rerun_skips_scans_whose_results_exist_and_overwrite_recomputes_them(model_file, scans, tmp_path, capsys):
    out = tmp_path / "out"
    assert segment(model_file, scans, "-o", out) == 0
    first = {name: (out / name).stat().st_ino for name in names(out)}
    (out / "b_seg.nii.gz").unlink()  # as if the first run had been stopped after a
    capsys.readouterr()
    assert segment(model_file, scans, "-o", out) == 0
    captured = capsys.readouterr()
    assert f"a.nii.gz: skipped, its results exist ({out / 'a_seg.nii.gz'})" in captured.out
    assert "b.nii.gz ->" in captured.out
    assert "1 segmented, 1 skipped of 2 scans" in captured.err
    assert (out / "a_seg.nii.gz").stat().st_ino == first["a_seg.nii.gz"]  # the file was not rewritten
    assert segment(model_file, scans, "-o", out, "--overwrite") == 0
    assert (out / "a_seg.nii.gz").stat().st_ino != first["a_seg.nii.gz"]
    assert "skipped" not in capsys.readouterr().out


def test_an_existing_file_that_is_not_this_scans_result_is_never_overwritten(model_file, scans, tmp_path, capsys):
    out = tmp_path / "out"
    other = write_scan(out / "a_seg.nii.gz", shape=(5, 5, 5))
    before = other.read_bytes()
    assert segment(model_file, scans, "-o", out) == 1
    captured = capsys.readouterr()
    assert "a_seg.nii.gz exists but is not a result of this scan (shape 5x5x5, the scan's is 12x14x9)" in captured.out
    assert other.read_bytes() == before and (out / "b_seg.nii.gz").exists()
    # results of another kind of run: refused, not mixed
    assert segment(model_file, scans / "b.nii.gz", "-o", out, "--quality", "2") == 1
    assert "b_std.nii.gz does not (an earlier run made other results)" in capsys.readouterr().out
    assert segment(model_file, scans, "-o", out, "--overwrite") == 0
    assert nib.load(out / "a_seg.nii.gz").shape == SHAPE


# ------------------------------------------------------------------------------------------ collisions


def test_scans_with_the_same_name_get_distinct_results(model_file, tmp_path, capsys):
    t1 = [write_scan(tmp_path / sub / "anat" / "T1w.nii.gz", seed) for seed, sub in enumerate(("sub-01", "sub-02"))]
    case = [write_scan(tmp_path / "cases" / name, seed) for seed, name in enumerate(("case.nii.gz", "case.nrrd"))]
    out = tmp_path / "out"
    assert segment(model_file, *t1, tmp_path / "cases", "-o", out) == 0
    assert names(out) == ["case_niigz_seg.nii.gz", "case_nrrd_seg.nii.gz", "sub-01_anat_T1w_seg.nii.gz",
                          "sub-02_anat_T1w_seg.nii.gz"]
    lines = capsys.readouterr().out.splitlines()
    assert f"{t1[0]} -> {out / 'sub-01_anat_T1w_seg.nii.gz'}" in lines[0] and str(case[1]) in lines[-1]


def test_a_named_output_gets_its_std_map_beside_it_not_over_it(model_file, scans, tmp_path):
    out = tmp_path / "case_std.nii.gz"
    assert segment(model_file, scans / "a.nii.gz", "-o", out, "--quality", "2") == 0
    assert nib.load(out).get_data_dtype() == np.uint8  # the labels
    assert nib.load(tmp_path / "case_std_std.nii.gz").get_data_dtype() == np.float32  # the std map


@pytest.mark.parametrize(
    "inputs, output, message",
    [
        (["A.nii.gz", "a.nii.gz"], "out", "would both be written to"),  # one file on macOS and Windows
        (["a.nii.gz"], "a.nii.gz", "would be written over the input"),
        (["a.nii.gz", "b.nii.gz"], "one.nii.gz", "names one file, but there are 2 scans: give a folder"),
    ],
)
def test_plans_that_would_lose_a_result_are_refused_before_any_work(inputs, output, message, model_file, tmp_path,
                                                                    capsys, monkeypatch):
    paths = [write_scan(tmp_path / name, seed) for seed, name in enumerate(inputs)]
    before = names(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda name: pytest.fail("the work started"))
    assert segment(model_file, *paths, "-o", tmp_path / output) == 1
    assert message in capsys.readouterr().err
    assert names(tmp_path) == before


def test_an_input_given_twice_is_segmented_once(model_file, scans, tmp_path, capsys):
    assert segment(model_file, scans, scans / "a.nii.gz", "-o", tmp_path / "out") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


# ------------------------------------------------------------------------------------------ empty inputs


def test_an_empty_folder_says_what_was_looked_for_without_itk_noise(model_file, tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no scans")
    assert segment(model_file, tmp_path / "empty", "-o", tmp_path / "out") == 1
    err = capfd.readouterr().err
    assert f"no scans found in {tmp_path / 'empty'} (looked for .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd and " \
           "DICOM series)" in err
    assert "WARNING" not in err and "GDCM" not in err and len(err.strip().splitlines()) == 1


def test_a_constant_scan_fails_with_the_reason_and_the_others_go_on(model_file, scans, tmp_path, capsys):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), scans / "blank.nii.gz")
    assert segment(model_file, scans, "-o", tmp_path / "out") == 1
    assert "blank.nii.gz: FAILED: the image is constant (all values 0.0): nothing to segment" in capsys.readouterr().out
    assert names(tmp_path / "out") == ["a_seg.nii.gz", "b_seg.nii.gz"]


# ----------------------------------------------------------------------------- file system and memory


def test_an_output_folder_under_a_file_is_one_line_before_any_work(model_file, scans, capsys):
    assert segment(model_file, scans, "-o", scans / "a.nii.gz" / "out") == 1
    err = capsys.readouterr().err
    assert f"cannot use {scans / 'a.nii.gz' / 'out'} as the output folder: {scans / 'a.nii.gz'} is a file" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_output_folder_is_refused_before_any_work(model_file, scans, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert segment(model_file, scans, "-o", out) == 1
    finally:
        out.chmod(0o700)
    assert f"cannot write to the output folder {out}: Permission denied" in capsys.readouterr().err


def test_an_output_folder_the_system_refuses_is_reported_before_any_work(model_file, scans, tmp_path, capsys,
                                                                         monkeypatch):
    def refused(dir):  # what a read-only folder, or one of another user, answers (root is never refused)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(cli, "load_model", lambda name: pytest.fail("the work started"))
    assert segment(model_file, scans, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err == f"mednca: error: cannot write to the output folder {tmp_path / 'out'}: Permission denied\n"


def test_a_full_disk_fails_each_scan_in_one_line_and_leaves_no_litter(model_file, scans, tmp_path, capsys,
                                                                      monkeypatch):
    def full(image, filename):
        open(filename, "wb").write(b"part of a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(volume.nib, "save", full)
    out = tmp_path / "out"
    assert segment(model_file, scans, "-o", out) == 1
    captured = capsys.readouterr()
    assert f"a.nii.gz: FAILED: cannot write {out / 'a_seg.nii.gz'}: No space left on device" in captured.out
    assert "b.nii.gz: FAILED" in captured.out and "Traceback" not in captured.err
    assert names(out) == []


def test_running_out_of_memory_fails_that_scan_and_keeps_the_rest(model_file, scans, tmp_path, capsys, monkeypatch):
    real = cli.read_volume

    def bomb(path):  # a 1 MB file whose header claims 32 GB
        if path.name == "a.nii.gz":
            raise MemoryError("Unable to allocate 32.0 GiB for an array with shape (2048, 2048, 2048)")
        return real(path)

    monkeypatch.setattr(cli, "read_volume", bomb)
    assert segment(model_file, scans, "-o", tmp_path / "out") == 1
    out = capsys.readouterr().out
    assert "a.nii.gz: FAILED: not enough memory for this scan (Unable to allocate 32.0 GiB" in out
    assert names(tmp_path / "out") == ["b_seg.nii.gz"]


# ------------------------------------------------------------------------------------------ temp litter

KILLED_WRITER = """
import os, signal, sys
import numpy as np
from mednca import volume

def killed(image, filename):
    open(filename, "wb").write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

volume.nib.save = killed
volume.write_volume(volume.Volume(np.zeros((2, 2, 2), np.uint8), np.eye(4)), sys.argv[1])
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL, and looking a process up by id, are POSIX")
def test_temporary_files_of_a_killed_writer_are_removed_at_the_next_run(model_file, scans, tmp_path, capsys):
    out = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out / "a_seg.nii.gz")])
    assert writer.wait(timeout=300) == -signal.SIGKILL
    (stale,) = out.iterdir()
    assert stale.is_dir() and stale.name.startswith(".mednca-tmp-") and f"-{writer.pid}-" in stale.name
    live = tempfile.mkdtemp(prefix=staging.temp_prefix(), dir=out)  # a writer that still runs: this process
    assert segment(model_file, scans, "-o", out) == 0
    assert names(out) == sorted([os.path.basename(live), "a_seg.nii.gz", "b_seg.nii.gz"])
    assert f"removed 1 temporary folder(s) in {out} left by a mednca run that was killed" in capsys.readouterr().err
