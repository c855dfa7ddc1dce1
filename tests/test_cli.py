"""The ``mednca`` command line: one line of result per scan, clear one-line errors, exit codes, option values
refused before any work, help that explains every option, and a thread count that suits a busy machine."""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import pytest
from cli_support import AFFINE, SHAPE

from mednca import cli, threads
from mednca.cli import build_parser, main


def test_segment_a_folder_writes_one_label_file_per_scan(model_file, scans, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    assert main(["segment", str(scans), "-o", str(out), "--model", str(model_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("->" in line for line in lines)
    for name in ("a", "b"):
        seg = nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == SHAPE
        np.testing.assert_allclose(seg.affine, AFFINE)


def test_segment_with_quality_writes_the_std_map_beside_the_named_output(model_file, scans, tmp_path, capsys,
                                                                         one_thread):
    out = tmp_path / "one.nii.gz"
    assert main(["segment", str(scans / "a.nii.gz"), "-o", str(out), "--model", str(model_file),
                 "--quality", "3", "--seed", "2"]) == 0
    assert "verdict: " in capsys.readouterr().out
    assert out.exists() and (tmp_path / "one_std.nii.gz").exists()
    assert nib.load(tmp_path / "one_std.nii.gz").get_fdata().dtype.kind == "f"  # the std map, not the labels


def test_a_bad_scan_fails_alone_with_a_clear_message(model_file, scans, tmp_path, capsys, one_thread):
    (scans / "broken.nii.gz").write_bytes(b"not a scan")
    assert main(["segment", str(scans), "-o", str(tmp_path / "out"), "--model", str(model_file)]) == 1
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
    before = target.read_bytes()
    assert main(["import-reference", str(reference_dir), "-o", str(target)]) == 1  # a model is never replaced
    assert "already exists" in capsys.readouterr().err and target.read_bytes() == before


# ------------------------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "x.nii.gz", "-o", "out", "--seed", "-1"], "--seed: -1 is out of range"),
        (["segment", "x.nii.gz", "-o", "out", "--threads", "0"], "--threads: 0 is out of range"),
        (["segment", "x.nii.gz", "-o", "out", "--seed", "two"], "--seed: 'two' is not a whole number"),
        (["evaluate", "m", "data", "--limit", "0"], "--limit: 0 is out of range"),
        (["train", "data", "-o", "m.safetensors", "--eval-every", "0"], "--eval-every: 0 is out of range"),
        (["train", "data", "-o", "m.safetensors", "--checkpoint-every", "0"], "--checkpoint-every: 0 is out of"),
        (["train", "data", "-o", "m.safetensors", "--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["train", "data", "-o", "m.safetensors", "--iterations", "-5"], "--iterations: -5 is out of range"),
        (["train", "data", "-o", "m.safetensors", "--iterations", "0"], "--iterations: 0 is out of range"),
        (["train", "data", "-o", "m.safetensors", "--val-fraction", "1"], "--val-fraction: 1 is out of range"),
        (["train", "data", "-o", "m.safetensors", "--val-fraction", "-0.1"], "--val-fraction: -0.1 is out of"),
        (["train", "data", "-o", "m.safetensors", "--val-fraction", "nan"], "--val-fraction: nan is out of range"),
        (["train", "data", "-o", "m.safetensors", "--lr", "0"], "--lr: 0 is not a positive learning rate"),
        (["train", "data", "-o", "m.safetensors", "--lr", "inf"], "--lr: inf is not a positive learning rate"),
        (["train", "data", "-o", "m.safetensors", "--crop", "0"], "--crop: 0 is out of range"),
    ],
)
def test_option_values_out_of_range_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["segment", "x.nii.gz", "-o", "out"], ["evaluate", "m", "data"]])
def test_quality_is_off_with_0_and_refuses_1_and_absurd_run_counts(command, capsys):
    assert build_parser().parse_args([*command, "--quality", "0"]).quality == 0
    assert build_parser().parse_args([*command, "--quality", str(cli.MAX_QUALITY_RUNS)]).quality == 100
    for value, message in (("1", "it compares 2 or more runs (0 turns it off)"),
                           ("100000000", "more than the 100 allowed: memory grows with the runs")):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--quality", value])
        assert exc.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- help


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_help_describes_every_option_with_its_default_and_gives_examples():
    top = build_parser().format_help()
    assert "``" not in top and "mednca COMMAND --help" in top
    for name, parser in _commands().items():
        text = parser.format_help()
        assert "examples:\n  mednca " + name in text, name
        undescribed = [a.dest for a in parser._actions if not (a.help or "").strip()]
        assert not undescribed, f"{name}: {undescribed} have no description"
    segment = " ".join(_commands()["segment"].format_help().split())  # unwrapped
    assert "(default: hippocampus)" in segment and "gives the same labels (default: 0)" in segment
    assert "0 makes none (default: 0)" in segment and "(2 to 100)" in segment
    assert "the cores not already busy, from the 1-minute load average" in segment
    assert "(default: None)" not in segment and "(default: False)" not in segment


# ---------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("cores, load, expected", [(2, 0.1, 2), (2, 1.2, 1), (2, 7.0, 1), (8, 2.4, 6), (4, 0, 4)])
def test_default_threads_are_the_free_cores(cores, load, expected, monkeypatch):
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 8)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert threads.default_threads() == expected


def test_default_threads_never_exceed_torchs_own_default(monkeypatch):
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 4)
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.default_threads() == 4


def test_segment_runs_on_the_default_threads_unless_told(model_file, scans, tmp_path, monkeypatch):
    used = []
    real = cli.segment_iter

    def spy(model, volume, **opts):
        used.append(opts["threads"])
        return real(model, volume, **opts)

    monkeypatch.setattr(cli, "segment_iter", spy)
    monkeypatch.setattr(cli, "default_threads", lambda: 1)
    scan = str(scans / "a.nii.gz")
    assert main(["segment", scan, "-o", str(tmp_path / "o1"), "--model", str(model_file)]) == 0
    assert main(["segment", scan, "-o", str(tmp_path / "o2"), "--model", str(model_file), "--threads", "2"]) == 0
    assert used == [1, 2]
