"""Train widget, driven as a user would: choose a Decathlon-style folder, train, find the model in the lists."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
from gui_annotation import screenshot_shows_something
from gui_support import tiny_model_path  # noqa: F401 (a fixture)

from mednca.datasets import make_phantom
from mednca.inference import torch_threads
from mednca.registry import list_models, load_model
from napari_nca._qt.segment_widget import SegmentWidget
from napari_nca._qt.train_widget import TrainWidget

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
def setup(make_napari_viewer, task_folder, tiny_model_path):  # noqa: F811
    """A viewer with the Train widget set to continue the tiny model on a 4-case folder, and a Segment widget."""
    tiny = tiny_model_path
    viewer = make_napari_viewer(show=True)
    widget = TrainWidget(viewer)
    other = SegmentWidget(viewer)
    viewer.window.add_dock_widget(other, name="Segment")
    viewer.window.add_dock_widget(widget, name="Train")
    widget.folder.value = task_folder
    widget.from_model.value = True
    widget.picker.set_path(tiny)
    with torch_threads(1):
        yield viewer, widget, other, tiny


def test_train_saves_a_model_that_every_list_shows(qtbot, setup, tmp_path):
    viewer, widget, other, tiny = setup
    widget.iterations.value = 10
    widget.name.value = "phantom-model"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=40_000)

    assert "Saved as phantom-model" in widget.result_label.text()
    assert "phantom-model" in [entry.name for entry in list_models()]
    assert other.picker.combo.findText("phantom-model") >= 0, "the Segment widget's model list was not refreshed"
    trained = load_model("phantom-model")
    assert trained.provenance["iterations"] == 10
    assert len(trained.provenance["validation_cases"]) == 1
    assert trained.config == load_model(tiny).config
    assert [i for i, _ in widget.plot.losses] == list(range(1, 11))
    assert len(widget.plot.dice) == 10 and all(0.0 <= d <= 1.0 for _, d in widget.plot.dice)
    assert widget.progress.bar.value() == widget.progress.bar.maximum()
    screenshot_shows_something(viewer, tmp_path / "train.png")


def test_cancel_saves_nothing(qtbot, setup, tmp_path):
    viewer, widget, _, tiny = setup
    widget.iterations.value = 100_000
    widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 2, timeout=30_000)
    widget.progress.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=20_000)
    assert "Cancelled" in widget.result_label.text()
    assert [p.name for p in tiny.parent.iterdir()] == [tiny.name]
    screenshot_shows_something(viewer, tmp_path / "cancelled.png")


def test_a_bad_name_keeps_the_model_until_saved_again(qtbot, setup, tmp_path):
    viewer, widget, _, _ = setup
    widget.iterations.value = 2
    widget.name.value = "no spaces allowed"
    widget.start()
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=30_000)
    assert "Not saved" in widget.result_label.text() and widget.trained is not None
    screenshot_shows_something(viewer, tmp_path / "not-saved.png")
    widget.name.value = "fixed-name"
    widget.save_button.click()
    assert "fixed-name" in [entry.name for entry in list_models()]
    assert widget.trained is None


def test_a_folder_without_dataset_json_starts_nothing(setup, tmp_path):
    viewer, widget, _, _ = setup
    widget.folder.value = tmp_path
    assert widget.start() is None
    assert not widget.progress.busy and widget.worker is None
    screenshot_shows_something(viewer, tmp_path / "nothing.png")
