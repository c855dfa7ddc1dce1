"""The Segment widget driven as a user would: open a scan, segment it, record and replay the growth,
export the animation, cancel a run, save the labels in the scan's geometry."""

from __future__ import annotations

import sys

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
from gui_support import assert_not_blank, phantom_copy, tiny_model_path, wait_for  # noqa: F401
from napari.layers import Image, Labels
from qtpy.QtCore import Qt

from napari_nca._qt.segment_widget import WHOLE_VOLUME

pytestmark = pytest.mark.gui


@pytest.fixture
def segment_ui(make_napari_viewer, phantom_copy, tiny_model_path):  # noqa: F811
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(phantom_copy), plugin="napari-nca")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nca", "Segment")
    widget.picker.set_path(tiny_model_path)
    return viewer, widget, image


def test_segment_record_growth_export_and_save(segment_ui, qtbot, tmp_path, phantom_copy, monkeypatch):  # noqa: F811
    viewer, widget, image = segment_ui
    assert isinstance(image, Image) and widget.image.value is image
    assert widget.steps.value == 4  # the model's own settings are the starting values

    widget.with_probabilities.value = True
    qtbot.mouseClick(widget.segment_button, Qt.LeftButton)
    wait_for(qtbot, widget.progress)
    seg = viewer.layers["phantom segmentation"]
    assert viewer.layers["phantom probability: foreground"].data.max() <= 1
    assert widget.image.choices == (image,)  # computed maps are not offered as scans to segment
    assert isinstance(seg, Labels) and seg.data.shape == image.data.shape
    value = int(seg.data[0, 0, 0])  # the class name shows under the cursor
    assert f"class: {['background', 'foreground'][value]}" in seg.get_status((0, 0, 0), world=True)["coordinates"]
    assert widget.progress.label.text() == "done"
    # the slider runs along the model's slice axis (2): the view shows axes 0 and 1
    assert tuple(viewer.dims.displayed) == (0, 1)

    viewer.dims.set_current_step(2, 20)
    qtbot.mouseClick(widget.growth_button, Qt.LeftButton)
    wait_for(qtbot, widget.progress)
    growth = viewer.layers["phantom growth: foreground"]
    assert growth.data.shape == (8, 36, 50, 1)  # 4 + 4 steps of the chosen slice
    assert viewer.dims.nsteps[0] == 8 and viewer.dims.current_step[3] == 20
    viewer.layers["phantom probability: foreground"].visible = False  # the growth alone over the scan
    shots = []
    for step in (0, 7):
        viewer.dims.set_current_step(0, step)
        shots.append(viewer.screenshot(canvas_only=True, flash=False))
    assert not np.array_equal(shots[0], shots[1]), "stepping through the growth changes nothing on screen"

    gif = tmp_path / "growth.gif"
    assert widget.export_animation(gif)
    assert iio.imread(gif, index=None).shape[0] == 8
    mp4 = tmp_path / "growth.mp4"
    assert widget.export_animation(mp4)
    assert len(list(iio.imiter(mp4, plugin="FFMPEG"))) == 8
    shown = []
    monkeypatch.setattr("napari_nca._qt.segment_widget.show_error", shown.append)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    assert not widget.export_animation(tmp_path / "other.mp4")
    assert "imageio-ffmpeg" in shown[0] and not (tmp_path / "other.mp4").exists()

    widget.growth_scope.value = WHOLE_VOLUME
    widget.record_growth()
    wait_for(qtbot, widget.progress)
    assert viewer.layers["phantom growth: foreground"].data.shape == (8, *image.data.shape)

    out = tmp_path / "phantom_seg.nii.gz"
    seg.save(str(out), plugin="napari-nca")
    np.testing.assert_allclose(nib.load(out).affine, nib.load(phantom_copy).affine)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), seg.data)

    shot = tmp_path / "segment.png"
    viewer.window.screenshot(str(shot), canvas_only=False)
    assert_not_blank(iio.imread(shot))


def test_cancel_stops_a_run_without_a_result(segment_ui, qtbot):
    viewer, widget, _ = segment_ui
    widget.steps.value = 400  # long enough to cancel midway
    worker = widget.segment()
    widget.progress.cancel_button.click()
    wait_for(qtbot, widget.progress)
    assert worker.abort_requested
    assert widget.progress.label.text() == "cancelled"
    assert "phantom segmentation" not in viewer.layers


def test_bad_input_becomes_a_notification(segment_ui, qtbot, monkeypatch):
    viewer, widget, image = segment_ui
    shown = []
    monkeypatch.setattr("napari_nca._qt._common.show_error", shown.append)
    image.data = np.full(image.data.shape, np.nan, np.float32)
    widget.segment()
    wait_for(qtbot, widget.progress)
    assert shown and "no finite value" in shown[0]
    assert widget.progress.label.text().startswith("failed")
    assert "phantom segmentation" not in viewer.layers


def test_model_list_shows_models_saved_later_and_survives_a_cancelled_dialog(qtbot, tiny_model_path, monkeypatch):  # noqa: F811
    from mednca.model import MedNCA, NCAConfig
    from mednca.registry import save_user_model
    from napari_nca._qt._common import FILE_ITEM, ModelPicker

    picker = ModelPicker()
    qtbot.addWidget(picker)
    picker.set_path(tiny_model_path)
    save_user_model(MedNCA(NCAConfig(channels=8, hidden=16, steps=(2, 2))), "tuned")  # as Fine-tune does
    picker.combo.showPopup()
    picker.combo.hidePopup()
    names = [picker.combo.itemText(i) for i in range(picker.combo.count())]
    assert "tuned" in names and picker.current_path() == str(tiny_model_path)
    with qtbot.waitSignal(picker.model_changed):
        picker.combo.setCurrentIndex(names.index("tuned"))
    assert picker.current_model().config.steps == (2, 2)

    monkeypatch.setattr("napari_nca._qt._common.QFileDialog.getOpenFileName", lambda *_, **__: ("", ""))
    picker.combo.setCurrentIndex(names.index(FILE_ITEM))
    picker.combo.activated.emit(names.index(FILE_ITEM))
    assert picker.combo.currentText() == "tuned"
