"""Evaluation: Dice at native resolution, the NQM/Dice correlation, report files, and the command line."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from mednca import cli, evaluation
from mednca.artefacts import scan_under
from mednca.checkpoint import load_model_file, save_model
from mednca.cli import main
from mednca.data import dataset_config
from mednca.errors import MedNCAError
from mednca.evaluation import (
    CaseResult,
    EvaluationReport,
    case_dice,
    dice_score,
    evaluate,
    evaluate_iter,
    pearson,
    ranks,
    spearman,
)
from mednca.inference import quality_map, segment
from mednca.model import MedNCA, NCAConfig
from mednca.progress import run_to_end
from mednca.training import TrainEvent
from mednca.volume import read_volume

TINY = NCAConfig(channels=8, hidden=16, steps=(2, 2), input_size=(16, 16), output_channels=2, class_names=("a", "b"))
CASES = ("toy_001", "toy_002", "toy_003")


def make_decathlon(folder, shape=(18, 16, 5)):
    """A Decathlon task folder of three small cases: class 1 a bright block, class 2 a dim one beside it."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for i, name in enumerate(CASES):
        rng = np.random.default_rng(i)
        lab = np.zeros(shape, np.uint8)
        r = 3 + i
        lab[r : r + 6, 3:7] = 1
        lab[r : r + 6, 7:11] = 2
        img = rng.normal(0, 0.1, shape).astype(np.float32) + (lab == 1) + 0.5 * (lab == 2)
        affine = np.diag([1.0, 1.0, 1.5, 1.0])
        nib.save(nib.Nifti1Image(img, affine), folder / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), folder / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    index = {"name": "toy", "licence": "CC0", "labels": {"0": "background", "1": "A", "2": "B"}, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return make_decathlon(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    torch.manual_seed(0)
    return MedNCA(TINY)


# ------------------------------------------------------------------------------------------------ Dice


def test_dice_whole_and_per_class_on_hand_made_arrays():
    labels = np.zeros((4, 4, 1), np.uint8)
    labels[0, :, 0] = 1  # 4 voxels of class 1
    labels[1, :, 0] = 2  # 4 voxels of class 2
    pred = np.zeros_like(labels)
    pred[0, :2, 0] = 1  # 2 of class 1 right
    pred[1, :, 0] = 1  # class 2 predicted as class 1: whole structure right, classes wrong
    pred[2, :2, 0] = 2  # 2 voxels of class 2 where there is nothing
    whole, per_class = case_dice(pred, labels, ("a", "b"))
    assert whole == pytest.approx(2 * 6 / (8 + 8))
    assert per_class["a"] == pytest.approx(2 * 2 / (6 + 4))
    assert per_class["b"] == pytest.approx(0.0)


def test_dice_of_empty_masks():
    empty = np.zeros((3, 3, 3), np.uint8)
    some = empty.copy()
    some[1, 1, 1] = 1
    assert dice_score(empty, empty) == 1.0  # nothing there, nothing found: correct
    assert dice_score(some, empty) == 0.0
    assert dice_score(empty, some) == 0.0
    whole, per_class = case_dice(some, some, ("a", "b"))
    assert whole == 1.0 and per_class == {"a": 1.0, "b": 1.0}  # class b absent from both


def test_single_class_model_scores_every_label_as_its_class():
    labels = np.zeros((4, 4, 2), np.uint8)
    labels[0] = 1
    labels[1] = 2
    pred = (labels > 0).astype(np.uint8)
    assert case_dice(pred, labels, ("hippocampus",)) == (1.0, {"hippocampus": 1.0})


def test_labels_with_a_class_the_model_lacks_are_refused():
    labels = np.full((2, 2, 2), 3, np.uint8)
    with pytest.raises(MedNCAError, match="class 3"):
        case_dice(labels, labels, ("a", "b"))


# ----------------------------------------------------------------------------------------- correlation


def report_of(dice, nqm, names=("a", "b")):
    pairs = enumerate(zip(dice, nqm, strict=True))
    rows = [CaseResult(f"c{i}", float(d), {n: float(d) for n in names}, q, 1.0) for i, (d, q) in pairs]
    return EvaluationReport(rows, names, quality_runs=10 if nqm[0] is not None else 0)


def test_correlation_is_negative_when_nqm_flags_the_bad_cases():
    dice = np.array([0.91, 0.88, 0.85, 0.70, 0.40, 0.89])
    nqm = 0.02 + 0.3 * (1 - dice) ** 2  # bad cases have high NQM, not linearly
    c = report_of(dice, nqm).correlation()
    assert c["n"] == 6
    assert c["spearman"] == pytest.approx(-1.0)
    assert c["pearson"] == pytest.approx(np.corrcoef(nqm, dice)[0, 1])
    assert -1.0 < c["pearson"] < -0.8


def test_spearman_uses_average_ranks_for_ties():
    assert ranks([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]
    x, y = np.array([1.0, 2.0, 2.0, 5.0, 7.0]), np.array([9.0, 4.0, 6.0, 3.0, 0.0])
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_correlation_is_undefined_without_enough_cases_or_quality_maps():
    assert math.isnan(pearson([0.1, 0.2], [0.9, 0.8]))
    assert math.isnan(pearson([0.1, 0.1, 0.1], [0.9, 0.8, 0.7]))
    c = report_of([0.9, 0.8, 0.7], [None, None, None]).correlation()
    assert c["n"] == 0 and math.isnan(c["spearman"])
    assert "Pearson n/a" in report_of([0.9, 0.8], [0.01, 0.02]).table()


def test_summary_and_table():
    report = report_of([0.9, 0.7, 0.8], [0.01, 0.05, 0.03])
    mean, std = report.summary()["dice_whole"]
    assert mean == pytest.approx(0.8) and std == pytest.approx(np.std([0.9, 0.7, 0.8]))
    assert report.columns == ["dice_whole", "dice_a", "dice_b", "nqm", "seconds"]
    text = report.table()
    assert all(f"c{i}" in text for i in range(3))
    assert "0.8000 ± 0.0816" in text and "Spearman -1.000" in text and "3 cases" in text


def test_csv_and_json_round_trip(tmp_path):
    report = report_of([0.9, 0.7, 0.8], [0.01, 0.05, 0.03])
    back = EvaluationReport.from_json(report.to_json(tmp_path / "r.json"))
    assert back.rows == report.rows and back.class_names == report.class_names
    assert back.quality_runs == 10
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["correlation"]["n"] == 3 and doc["summary"]["nqm"]["mean"] == pytest.approx(0.03)
    back = EvaluationReport.from_csv(report.to_csv(tmp_path / "r.csv"))
    assert back.rows == report.rows and back.class_names == report.class_names
    with open(tmp_path / "r.csv", newline="") as f:
        assert next(csv.reader(f)) == ["case", "dice_whole", "dice_a", "dice_b", "nqm", "seconds"]


def test_json_writes_null_for_undefined_statistics(tmp_path):
    doc = json.loads(report_of([0.9], [None]).to_json(tmp_path / "r.json").read_text())
    assert doc["correlation"] == {"pearson": None, "spearman": None, "n": 0}


# ------------------------------------------------------------------------------------------ evaluation


def test_evaluation_scores_what_inference_produces(tiny_model, toy_dir):
    progress = []
    report = run_to_end(evaluate_iter(tiny_model, toy_dir, seed=3), progress.append)
    assert [r.case for r in report.rows] == list(CASES)
    assert progress[-1].done == progress[-1].total == 3
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    for row in report.rows:
        image = read_volume(toy_dir / "imagesTr" / f"{row.case}.nii.gz")
        labels = read_volume(toy_dir / "labelsTr" / f"{row.case}.nii.gz").array
        expected = case_dice(segment(tiny_model, image, seed=3).labels.array, labels, TINY.class_names)
        assert (row.dice_whole, row.dice) == expected
        assert row.nqm is None and row.seconds > 0


def test_quality_runs_give_each_case_its_nqm(tiny_model, toy_dir):
    report = evaluate(tiny_model, toy_dir, quality_runs=2, cases=["toy_002"])
    (row,) = report.rows
    image = read_volume(toy_dir / "imagesTr" / "toy_002.nii.gz")
    labels = read_volume(toy_dir / "labelsTr" / "toy_002.nii.gz").array
    q = quality_map(tiny_model, image, 2)
    assert row.nqm == pytest.approx(q.nqm)
    assert (row.dice_whole, row.dice) == case_dice(q.labels.array, labels, TINY.class_names)
    with pytest.raises(MedNCAError, match="at least 2 runs"):
        evaluate(tiny_model, toy_dir, quality_runs=1)


def test_pairs_of_volumes_are_evaluated_too(tiny_model, toy_dir):
    pairs = [(read_volume(toy_dir / "imagesTr" / f"{c}.nii.gz"), toy_dir / "labelsTr" / f"{c}.nii.gz") for c in CASES]
    assert [r.case for r in evaluate(tiny_model, pairs).rows] == list(CASES)


def test_validation_cases_are_the_models_own(toy_dir):
    model = MedNCA(TINY, provenance={"validation_cases": ["toy_003", "toy_001"]})
    assert [r.case for r in evaluate(model, toy_dir, cases="validation").rows] == ["toy_001", "toy_003"]
    with pytest.raises(MedNCAError, match="records no validation cases"):
        evaluate(MedNCA(TINY), toy_dir, cases="validation")
    with pytest.raises(MedNCAError, match="toy_404"):
        evaluate(model, toy_dir, cases=["toy_001", "toy_404"])
    with pytest.raises(MedNCAError, match="no cases"):
        evaluate(model, toy_dir, cases=[])


def test_a_label_map_that_does_not_fit_its_scan_is_named(tiny_model, toy_dir):
    image = read_volume(toy_dir / "imagesTr" / "toy_001.nii.gz")
    wrong = read_volume(toy_dir / "labelsTr" / "toy_002.nii.gz")
    wrong.array = wrong.array[:, :, :3].copy()
    with pytest.raises(MedNCAError, match=r"case toy_001: .*shape"):
        evaluate(tiny_model, [(image, wrong)])


# ------------------------------------------------------------------------------------------ artefacts


def test_perturb_scores_each_case_clean_and_under_each_artefact(tiny_model, toy_dir, tmp_path):
    progress = []
    gen = evaluate_iter(tiny_model, toy_dir, seed=3, cases=["toy_001", "toy_002"], perturb=["noise", "inversion"])
    report = run_to_end(gen, progress.append)
    conditions = ("none", "noise", "inversion")
    assert [(r.case, r.artefact) for r in report.rows] == [(c, a) for c in ("toy_001", "toy_002") for a in conditions]
    assert progress[-1].done == progress[-1].total == 6
    assert "toy_002 (inversion)" in {p.stage for p in progress}
    for row in report.rows:  # what inference gives on the corrupted scan, scored against the untouched labels
        image = read_volume(toy_dir / "imagesTr" / f"{row.case}.nii.gz")
        labels = read_volume(toy_dir / "labelsTr" / f"{row.case}.nii.gz").array
        scan = scan_under(image, row.case, row.artefact, 3)
        assert (row.dice_whole, row.dice) == case_dice(segment(tiny_model, scan, seed=3).labels.array, labels,
                                                       TINY.class_names)
    clean = evaluate(tiny_model, toy_dir, seed=3, cases=["toy_001", "toy_002"])
    assert [r.dice for r in clean.rows] == [r.dice for r in report.rows if r.artefact == "none"]
    assert report.meta["perturb"] == ["noise", "inversion"]

    groups = report.by_artefact()
    assert list(groups) == list(conditions)
    noise = [r.dice_whole for r in report.rows if r.artefact == "noise"]
    assert groups["noise"].summary()["dice_whole"][0] == pytest.approx(np.mean(noise))
    text = report.table()
    assert "artefact" in text.splitlines()[0] and "2 cases x 3 conditions (none, noise, inversion)" in text
    assert sum(line.startswith("mean ± std") for line in text.splitlines()) == 3

    back = EvaluationReport.from_csv(report.to_csv(tmp_path / "p.csv"))
    assert back.rows == report.rows
    with open(tmp_path / "p.csv", newline="") as f:
        assert next(csv.reader(f)) == ["case", "artefact", "dice_whole", "dice_a", "dice_b", "seconds"]
    assert EvaluationReport.from_json(report.to_json(tmp_path / "p.json")).rows == report.rows
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["by_artefact"]["noise"]["summary"]["dice_whole"]["mean"] == pytest.approx(np.mean(noise))


def test_perturbed_quality_maps_give_each_condition_its_nqm(tiny_model, toy_dir):
    report = evaluate(tiny_model, toy_dir, quality_runs=2, cases=["toy_003"], perturb="blur", seed=1)
    clean, blurred = report.rows
    image = read_volume(toy_dir / "imagesTr" / "toy_003.nii.gz")
    assert clean.nqm == pytest.approx(quality_map(tiny_model, image, 2, seed=1).nqm)
    assert blurred.nqm == pytest.approx(quality_map(tiny_model, scan_under(image, "toy_003", "blur", 1), 2, seed=1).nqm)
    assert "[blur]" in report.table()  # the NQM/Dice correlation is given per condition


def test_every_model_is_shown_the_same_corrupted_scans(toy_dir, monkeypatch):
    seen = []
    real = evaluation.segment_iter

    def spy(model, volume, **options):
        seen.append(volume.array.copy())
        return real(model, volume, **options)

    monkeypatch.setattr(evaluation, "segment_iter", spy)
    for seed in (0, 1):
        torch.manual_seed(seed)
        evaluate(MedNCA(TINY), toy_dir, cases=["toy_001"], perturb=["motion", "spike"])
    first, second = seen[:3], seen[3:]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[1], first[2]) and not np.array_equal(first[0], first[1])


def test_an_unknown_artefact_stops_the_evaluation_before_it_starts(tiny_model, toy_dir):
    with pytest.raises(MedNCAError, match="unknown artefact 'smudge'; valid artefacts: ghosting"):
        next(evaluate_iter(tiny_model, toy_dir, perturb=["noise", "smudge"]))


# ---------------------------------------------------------------------------------------- command line


def test_cli_evaluate_prints_the_table_and_writes_reports(tiny_model, toy_dir, tmp_path, capsys):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors")
    code = main(["evaluate", str(path), str(toy_dir), "--cases", "toy_001,toy_003", "--quality", "2",
                 "--csv", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "toy_001" in out and "toy_003" in out and "toy_002" not in out and "Spearman" in out
    assert [r.case for r in EvaluationReport.from_csv(tmp_path / "r.csv").rows] == ["toy_001", "toy_003"]
    assert EvaluationReport.from_json(tmp_path / "r.json").quality_runs == 2
    assert main(["evaluate", str(path), str(toy_dir), "--limit", "2"]) == 0
    captured = capsys.readouterr()
    assert "toy_002" in captured.out and "toy_003" not in captured.out
    assert "records no validation cases" in captured.err  # said aloud: these may be training cases


def test_cli_evaluate_scores_every_case_under_the_artefacts_asked_for(tiny_model, toy_dir, tmp_path, capsys):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors")
    base = ["evaluate", str(path), str(toy_dir), "--cases", "toy_001"]
    assert main([*base, "--perturb", "noise,blur", "--csv", str(tmp_path / "p.csv")]) == 0
    assert "1 case x 3 conditions (none, noise, blur)" in capsys.readouterr().out
    rows = EvaluationReport.from_csv(tmp_path / "p.csv").rows
    assert [(r.case, r.artefact) for r in rows] == [("toy_001", "none"), ("toy_001", "noise"), ("toy_001", "blur")]
    assert main([*base, "--perturb", "all"]) == 0
    assert "1 case x 9 conditions" in capsys.readouterr().out
    assert main([*base, "--perturb", "noise,smudge", "--csv", str(tmp_path / "q.csv")]) == 1
    assert "mednca: error: unknown artefact 'smudge'; valid artefacts: ghosting" in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists()


def test_cli_reports_a_bad_folder_clearly(tiny_model, tmp_path, capsys):
    path = save_model(tiny_model, tmp_path / "tiny.safetensors")
    assert main(["evaluate", str(path), str(tmp_path / "missing")]) == 1
    assert "data folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "no dataset.json" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_train_writes_a_model_that_evaluates_on_its_validation_cases(tiny_model, toy_dir, tmp_path, capsys):
    tiny = save_model(tiny_model, tmp_path / "tiny.safetensors")  # --init: a small architecture trains fast
    out = tmp_path / "trained.safetensors"
    args = ["train", str(toy_dir), "-o", str(out), "--init", str(tiny), "--iterations", "3", "--batch-size", "2",
            "--val-fraction", "0.34"]
    assert main(args) == 0
    model = load_model_file(out)
    (val,) = model.provenance["validation_cases"]
    assert model.provenance["iterations"] == 3
    assert model.provenance["training_data"] == {"name": "toy", "licence": "CC0"}
    checkpoint = out.with_suffix(".ckpt")  # kept beside the model by default
    assert checkpoint.exists()
    capsys.readouterr()
    assert main(["evaluate", str(out), str(toy_dir)]) == 0
    captured = capsys.readouterr()
    assert val in captured.out and "validation cases" in captured.err
    assert all(case not in captured.out for case in CASES if case != val)
    # a second run never overwrites the model, nor starts over a checkpoint it was not asked to resume
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    args[args.index(str(out))] = str(tmp_path / "again.safetensors")
    args += ["--checkpoint", str(checkpoint)]
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    args[args.index("3")] = "5"
    assert main([*args, "--resume", "--crop", "4"]) == 1  # resuming must keep the recipe
    assert "different training setup" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert load_model_file(tmp_path / "again.safetensors").provenance["iterations"] == 5


def test_cli_train_recipe_options_reach_the_model(tiny_model, toy_dir, tmp_path, capsys):
    tiny = save_model(tiny_model, tmp_path / "tiny.safetensors")
    base = ["train", str(toy_dir), "--init", str(tiny), "--iterations", "2", "--batch-size", "2"]
    options = ["--crop", "4", "--no-augment", "--artefacts", "0.3", "--thick-across", "0.2"]
    assert main([*base, "-o", str(tmp_path / "a.safetensors"), *options]) == 0
    recipe = load_model_file(tmp_path / "a.safetensors").provenance["recipe"]
    assert recipe["crop"] == 4 and recipe["augment"] is False and recipe["artefacts"] == 0.3
    assert recipe["thick_across"] == 0.2
    assert main([*base, "-o", str(tmp_path / "b.safetensors"), "--crop", "999"]) == 1
    assert "crop must be 1 to" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_ctrl_c_during_training_writes_no_model_and_says_how_to_resume(toy_dir, tmp_path, capsys, monkeypatch):
    def interrupted(data, **options):
        yield TrainEvent(2, 10, None, 1.0, "checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train_iter", interrupted)
    out = tmp_path / "m.safetensors"
    args = ["train", str(toy_dir), "-o", str(out), "--iterations", "10", "--seed", "4", "--crop", "8", "--no-augment",
            "--artefacts", "0.25", "--thick-across", "0.1"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert not out.exists()
    assert "interrupted at iteration 2" in err and "holds iteration 2" in err
    assert f"--checkpoint {out.with_suffix('.ckpt')} --resume --iterations 10" in err and "--seed 4" in err
    assert "--crop 8" in err and "--no-augment" in err and "--artefacts 0.25" in err  # else it would be refused
    assert "--thick-across 0.1" in err


def test_training_names_the_classes_as_dataset_json_does(toy_dir, tmp_path):
    assert dataset_config(toy_dir).class_names == ("a", "b")
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    assert dataset_config(tmp_path).class_names == ("foreground",)


# ------------------------------------------------------------------------------------------- real data


def test_authors_model_on_real_cases(reference_model, hippocampus_dir):
    report = evaluate(reference_model, hippocampus_dir, cases=["hippocampus_374", "hippocampus_004"], threads=1)
    dice = {r.case: r.dice_whole for r in report.rows}
    assert dice["hippocampus_374"] > 0.85
    assert dice["hippocampus_004"] > 0.7
