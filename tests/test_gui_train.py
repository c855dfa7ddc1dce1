"""Train (advanced), driven as a user would: choose a Decathlon-style folder, train, find the model in the
panel's model list."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import torch.multiprocessing as mp
from gui_annotation import screenshot_shows_something
from gui_support import open_panel, timeout_ms, tiny_model_path, wait_for, work_unit  # noqa: F401 (fixtures)

from mednca.data_parallel import START_SECONDS, WORKER_NAME
from mednca.datasets import make_phantom
from mednca.registry import list_models, load_model

pytestmark = pytest.mark.gui


def decathlon_folder(root, n_cases: int = 4):
    """A task folder as the Medical Segmentation Decathlon lays it out, with phantom scans of several seeds."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    training = []
    for i in range(n_cases):
        image, label, affine = make_phantom(seed=i)
        name = f"phantom_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"name": "phantom", "labels": {"0": "background",
                                                   "1": "anterior", "2": "posterior"}, "training": training}))
    return root


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return decathlon_folder(tmp_path_factory.mktemp("data") / "Task99_Phantom")


@pytest.fixture
def setup(make_napari_viewer, task_folder, tiny_model_path, monkeypatch):  # noqa: F811
    """A viewer with the panel on its Train step, set to continue the tiny model on a 4-case folder."""
    viewer = make_napari_viewer(show=True)
    panel = open_panel(viewer, monkeypatch)
    panel.tabs.setCurrentWidget(panel.train)
    panel.picker.set_path(tiny_model_path)
    step = panel.train
    step.folder.setText(str(task_folder))
    step.from_model.setChecked(True)
    return viewer, panel, step, tiny_model_path


def test_train_saves_a_model_that_the_model_list_shows(qtbot, setup, tmp_path, work_unit):  # noqa: F811
    viewer, panel, step, tiny = setup
    step.iterations.setValue(10)
    step.name.setText("phantom-model")
    assert step.start() is not None
    wait_for(qtbot, panel.progress, work_unit, units=10)

    assert "Saved as phantom-model" in step.result_label.text()
    assert "phantom-model" in [entry.name for entry in list_models()]
    assert panel.picker.combo.findText("phantom-model") >= 0, "the model list was not refreshed"
    trained = load_model("phantom-model")
    assert trained.provenance["iterations"] == 10
    assert len(trained.provenance["validation_cases"]) == 1
    assert trained.config == load_model(tiny).config
    assert [i for i, _ in step.plot.losses] == list(range(1, 11))
    assert len(step.plot.dice) == 10 and all(0.0 <= d <= 1.0 for _, d in step.plot.dice)
    assert panel.progress.bar.value() == panel.progress.bar.maximum()
    screenshot_shows_something(viewer, tmp_path / "train.png")


def test_cancel_saves_nothing(qtbot, setup, tmp_path, work_unit):  # noqa: F811
    viewer, panel, step, tiny = setup
    step.iterations.setValue(100_000)
    step.start()
    qtbot.waitUntil(lambda: len(step.plot.losses) >= 2, timeout=60_000)
    panel.progress.cancel_button.click()
    wait_for(qtbot, panel.progress, work_unit)
    assert "Cancelled" in step.result_label.text()
    assert [p.name for p in tiny.parent.iterdir()] == [tiny.name]
    screenshot_shows_something(viewer, tmp_path / "cancelled.png")


def test_a_bad_name_keeps_the_model_until_saved_again(qtbot, setup, tmp_path, work_unit):  # noqa: F811
    viewer, panel, step, _ = setup
    step.iterations.setValue(2)
    step.name.setText("no spaces allowed")
    step.start()
    wait_for(qtbot, panel.progress, work_unit, units=5)
    assert "Not saved" in step.result_label.text() and step.trained is not None
    screenshot_shows_something(viewer, tmp_path / "not-saved.png")
    step.name.setText("fixed-name")
    step.save_button.click()
    assert "fixed-name" in [entry.name for entry in list_models()]
    assert step.trained is None


def test_a_folder_without_dataset_json_starts_nothing(setup, tmp_path):
    viewer, panel, step, _ = setup
    step.folder.setText(str(tmp_path))
    assert step.start() is None
    assert not panel.progress.busy and step.worker is None
    screenshot_shows_something(viewer, tmp_path / "nothing.png")


def training_processes() -> list:
    return [p for p in mp.active_children() if p.name.startswith(WORKER_NAME)]


def test_two_free_cores_train_on_two_processes_and_cancel_ends_them(qtbot, setup, tmp_path, work_unit,  # noqa: F811
                                                                    monkeypatch):
    viewer, panel, step, tiny = setup
    monkeypatch.setattr("napari_nca._qt.panel.default_threads", lambda: 2)  # two cores free when Train is pressed
    started = timeout_ms(work_unit, 10) + 1000 * START_SECONDS  # a process starting imports torch
    step.iterations.setValue(4)
    step.name.setText("two-processes")
    step.start()
    qtbot.waitUntil(lambda: not panel.progress.busy, timeout=started)
    assert "Saved as two-processes" in step.result_label.text()
    assert load_model("two-processes").provenance["training_processes"] == 2
    assert not training_processes(), "the second process outlived its training"

    step.iterations.setValue(100_000)
    step.start()
    qtbot.waitUntil(lambda: len(step.plot.losses) >= 2, timeout=started)
    assert "on 2 processes" in panel.progress.text
    assert len(training_processes()) == 1
    panel.progress.cancel_button.click()
    wait_for(qtbot, panel.progress, work_unit)
    assert "Cancelled" in step.result_label.text()
    qtbot.waitUntil(lambda: not training_processes(), timeout=timeout_ms(work_unit))
    screenshot_shows_something(viewer, tmp_path / "two-processes.png")
