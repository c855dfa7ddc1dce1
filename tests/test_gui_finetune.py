"""Fine-tune widget, driven as a user would: paint two slices, fine-tune, compare, keep or revert, cancel."""

from __future__ import annotations

import pytest
import torch
from gui_annotation import add_phantom, paint_slices, screenshot_shows_something
from gui_support import tiny_model_path  # noqa: F401 (a fixture)

from mednca.inference import torch_threads
from mednca.registry import list_models, load_model
from napari_nca._qt.finetune_widget import TUNED_SUFFIX, FinetuneWidget
from napari_nca._qt.segment_widget import SegmentWidget

pytestmark = pytest.mark.gui
PAINTED = (14, 22)


@pytest.fixture
def setup(make_napari_viewer, tiny_model_path):  # noqa: F811
    """A viewer with the phantom, an empty annotation layer and the Fine-tune and Segment widgets."""
    model_file = tiny_model_path
    viewer = make_napari_viewer(show=True)
    image, truth = add_phantom(viewer)
    annotation = viewer.add_labels(truth * 0, name="annotation", scale=image.scale, translate=image.translate)
    widget = FinetuneWidget(viewer)
    other = SegmentWidget(viewer)
    viewer.window.add_dock_widget(other, name="Segment")
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    widget.image.value, widget.labels.value = image, annotation
    widget.picker.set_path(model_file)
    with torch_threads(1):
        yield viewer, widget, other, annotation, truth, model_file


def run(qtbot, widget, iterations):
    widget.iterations.value = iterations
    worker = widget.start()
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=40_000)


def test_finetune_shows_result_and_keep_saves_a_listed_model(qtbot, setup, tmp_path):
    viewer, widget, other, annotation, truth, _ = setup
    assert "No annotated slice" in widget.slices_label.text()
    paint_slices(annotation, truth, PAINTED)
    assert "2 annotated slice(s) along axis 2: 14, 22" in widget.slices_label.text()

    widget.lr.value = 2e-3
    run(qtbot, widget, iterations=12)

    layer = viewer.layers[f"phantom{TUNED_SUFFIX}"]
    assert layer.data.shape == truth.shape
    assert "phantom" in viewer.layers  # the scan and the user's annotation stay
    assert [i for i, _ in widget.plot.losses] == list(range(1, 13))
    assert "before" in widget.result_label.text() and "after" in widget.result_label.text()
    assert widget.keep_button.isEnabled() and widget.revert_button.isEnabled()
    screenshot_shows_something(viewer, tmp_path / "finetune.png")

    widget.name_edit.setText("tiny-phantom")
    path = widget.keep()
    assert path is not None and path.is_file()
    assert "tiny-phantom" in [entry.name for entry in list_models()]
    assert other.picker.combo.findText("tiny-phantom") >= 0, "the Segment widget's model list was not refreshed"
    assert load_model("tiny-phantom").provenance["finetune"]["slices"] == list(PAINTED)
    assert not widget.keep_button.isEnabled()


def test_revert_discards_the_model_and_its_layer(qtbot, setup, tmp_path):
    viewer, widget, _, annotation, truth, model_file = setup
    paint_slices(annotation, truth, PAINTED)
    run(qtbot, widget, iterations=3)
    assert f"phantom{TUNED_SUFFIX}" in viewer.layers
    widget.revert()
    assert f"phantom{TUNED_SUFFIX}" not in viewer.layers
    assert widget.adapted is None and not widget.keep_button.isEnabled()
    assert [p.name for p in model_file.parent.iterdir()] == [model_file.name]
    screenshot_shows_something(viewer, tmp_path / "reverted.png")


def test_cancel_leaves_the_model_unchanged(qtbot, setup, tmp_path):
    viewer, widget, _, annotation, truth, model_file = setup
    paint_slices(annotation, truth, PAINTED)
    model = widget.picker.current_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    widget.iterations.value = 100_000
    widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 3, timeout=20_000)
    screenshot_shows_something(viewer, tmp_path / "running.png")
    widget.progress.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=20_000)

    assert "Cancelled" in widget.result_label.text()
    assert f"phantom{TUNED_SUFFIX}" not in viewer.layers
    assert widget.adapted is None and not widget.keep_button.isEnabled()
    after = widget.picker.current_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    on_disk = load_model(model_file).state_dict()
    assert all(torch.equal(before[k], on_disk[k]) for k in before)
