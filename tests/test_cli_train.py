"""``mednca train`` and ``mednca evaluate`` lose no work: every file training writes is checked before it
starts, a short run keeps checkpoints, diverged weights are never saved as a model, and a case that cannot be
scored is reported while the others are scored."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_support import make_task, tiny_model_file

from mednca import cli, training
from mednca.checkpoint import load_model_file
from mednca.cli import main


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"))


@pytest.fixture
def tiny(tmp_path):
    """--init with a small two-class architecture: training steps take milliseconds."""
    return tiny_model_file(tmp_path / "tiny.safetensors", classes=("a", "b"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models, a shared machine: every test here runs torch on one thread."""


def train(task, tiny, output, *extra) -> int:
    return main(["train", str(task), "-o", str(output), "--init", str(tiny), "--batch-size", "2",
                 "--val-fraction", "0.34", *map(str, extra)])


def never_trains(monkeypatch):
    monkeypatch.setattr(cli, "train_iter", lambda *a, **k: pytest.fail("training started"))


# --------------------------------------------------------------------------------------- output files


def test_an_existing_best_model_is_never_replaced_and_is_checked_before_training(task, tiny, tmp_path, capsys,
                                                                                monkeypatch):
    never_trains(monkeypatch)
    best = tiny_model_file(tmp_path / "best.safetensors")
    before = best.read_bytes()
    assert train(task, tiny, tmp_path / "m.safetensors", "--iterations", "2", "--best", best) == 1
    assert f"{best} already exists; choose another name" in capsys.readouterr().err
    assert best.read_bytes() == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--best", "best.txt"], "the best model (--best) must end in .safetensors, not 'best.txt'"),
        (["--best", "m.safetensors"], "names the same file as the model or the checkpoint"),
        (["--checkpoint", "m.safetensors"], "the checkpoint and the model would both be"),
        (["--best", "b.safetensors", "--val-fraction", "0"], "--best needs validation cases"),
    ],
)
def test_wrong_output_names_are_refused_before_training(extra, message, task, tiny, tmp_path, capsys, monkeypatch):
    never_trains(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert train(task, tiny, "m.safetensors", *extra) == 1
    assert message in capsys.readouterr().err


def test_a_model_folder_under_a_file_is_refused_before_training(task, tiny, tmp_path, capsys, monkeypatch):
    never_trains(monkeypatch)
    blocker = tmp_path / "models"
    blocker.write_text("a file where the folder should be")
    assert train(task, tiny, blocker / "m.safetensors") == 1
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err


def test_resuming_may_keep_updating_the_best_model_of_the_run_it_continues(task, tiny, tmp_path, capsys):
    out, best = tmp_path / "m.safetensors", tmp_path / "best.safetensors"
    assert train(task, tiny, tmp_path / "first.safetensors", "--iterations", "2", "--best", best,
                 "--checkpoint", tmp_path / "run.ckpt") == 0
    assert best.exists()
    assert train(task, tiny, out, "--iterations", "3", "--best", best, "--checkpoint", tmp_path / "run.ckpt",
                 "--resume") == 0
    assert load_model_file(out).provenance["iterations"] == 3


def test_the_recipe_options_are_recorded_and_a_run_resumes_only_with_them(task, tiny, tmp_path, capsys):
    ckpt, shapes = tmp_path / "run.ckpt", ("--artefacts", "0.25", "--thick-across", "0.1")
    assert train(task, tiny, tmp_path / "a.safetensors", "--iterations", "2", "--checkpoint", ckpt, *shapes,
                 "--spatial", "0.5") == 0
    recipe = load_model_file(tmp_path / "a.safetensors").provenance["recipe"]
    assert (recipe["artefacts"], recipe["thick_across"], recipe["spatial"]) == (0.25, 0.1, 0.5)
    capsys.readouterr()
    assert train(task, tiny, tmp_path / "b.safetensors", "--iterations", "3", "--checkpoint", ckpt, "--resume",
                 *shapes) != 0  # --spatial forgotten: continuing would be another training
    assert "recipe spatial: 0.5 then, 0.0 now" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


# ---------------------------------------------------------------------------------- data-parallel workers


def test_two_worker_processes_train_the_model_one_process_trains(task, tiny, tmp_path, capsys):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert train(task, tiny, one, "--iterations", "4") == 0
    assert train(task, tiny, two, "--iterations", "4", "--workers", "2") == 0
    assert "trained 4 iterations in" in capsys.readouterr().out
    a, b = load_model_file(one), load_model_file(two)
    assert b.provenance["training_processes"] == 2 and a.provenance["training_processes"] == 1
    assert "2 process(es) of 1 thread(s)" in b.provenance["trained_on"]  # where it ran, for a model table
    assert a.provenance["trained_on"].startswith("CPU: ") and torch.__version__ in a.provenance["trained_on"]
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)  # the same batches, summed gradients: rounding only


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "3"], "--workers 3 is more than the --batch-size 2 they share"),
        (["--workers", "2", "--threads", "2"], "--workers runs every process on one thread"),
    ],
)
def test_impossible_worker_settings_are_refused_before_training(extra, message, task, tiny, tmp_path, capsys,
                                                               monkeypatch):
    never_trains(monkeypatch)
    assert train(task, tiny, tmp_path / "m.safetensors", *extra) == 1
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- interruption, divergence


def test_a_short_run_interrupted_in_its_final_validation_keeps_its_iterations(task, tiny, tmp_path, capsys,
                                                                             monkeypatch):
    real = training.validation_dice

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "validation_dice", interrupted)
    out = tmp_path / "m.safetensors"
    assert train(task, tiny, out, "--iterations", "20") == 130  # only validation is at the end: iteration 20
    err = capsys.readouterr().err
    assert not out.exists()
    assert f"the checkpoint {out.with_suffix('.ckpt')} holds iteration 18" in err  # every 2 = a tenth of 20
    resume = err.split("continue with:\n  ")[1].strip().split()[1:]  # without "mednca"
    monkeypatch.setattr(training, "validation_dice", real)
    assert main(resume) == 0
    assert load_model_file(out).provenance["iterations"] == 20


def test_a_diverging_run_saves_no_model_and_says_to_lower_the_learning_rate(task, tiny, tmp_path, capsys):
    out, best = tmp_path / "m.safetensors", tmp_path / "best.safetensors"
    assert train(task, tiny, out, "--iterations", "40", "--lr", "1e9", "--eval-every", "1", "--best", best,
                 "--checkpoint-every", "1") == 1
    err = capsys.readouterr().err
    assert "mednca: error: training diverged (the loss became nan by iteration" in err
    assert "lower --lr (it was 1e+09)" in err and f"{out} was not written" in err
    assert not out.exists()
    # its checkpoint would only block the next run (and could only be continued with this --lr): removed
    assert f"removed {out.with_suffix('.ckpt')}" in err and not out.with_suffix(".ckpt").exists()
    assert not best.exists() or cli._finite_file(best)  # a best model is kept only with finite weights


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_scores_the_other_cases_when_one_fails_and_says_which(task, tiny, tmp_path, capsys):
    broken = make_task(tmp_path / "broken")
    labels = broken / "labelsTr" / "toy_002.nii.gz"
    nib.save(nib.Nifti1Image(np.full((18, 16, 5), 7, np.uint8), np.eye(4)), labels)  # a class the model lacks
    report = tmp_path / "report.json"
    assert main(["evaluate", str(tiny), str(broken), "--json", str(report)]) == 1
    captured = capsys.readouterr()
    table, failures = captured.out.split("2 cases\n")
    assert "toy_001" in table and "toy_003" in table and "toy_002" not in table
    assert "toy_002: FAILED: the labels hold class 7, but the model has only 2 classes" in failures
    assert "1 of 3 cases failed; the scores above are of the other 2" in captured.err
    saved = json.loads(report.read_text())
    assert [r["case"] for r in saved["rows"]] == ["toy_001", "toy_003"]
    assert "toy_002" in saved["meta"]["failed"]


def test_evaluate_checks_its_report_files_before_scoring(task, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "evaluate_iter", lambda *a, **k: pytest.fail("scoring started"))
    blocker = tmp_path / "reports"
    blocker.write_text("a file")
    assert main(["evaluate", str(tiny), str(task), "--csv", str(blocker / "r.csv")]) == 1
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
