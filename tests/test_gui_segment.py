"""The Segment step driven as a user would: open a scan, segment it, paint on the result and segment again
(nothing painted is lost), record and replay the growth, export the animation, cancel a run, save the
labels in the scan's geometry, and a view a clinician can read (contrast, units, axis names, colours)."""

from __future__ import annotations

import sys

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
from gui_support import (  # noqa: F401 (fixtures)
    assert_not_blank,
    nca,
    phantom_copy,
    tiny_model_path,
    wait_for,
    work_unit,
)
from napari.layers import Image, Labels
from qtpy.QtCore import Qt

from mednca.inference import segment
from mednca.registry import load_model
from napari_nca._colours import class_rgb
from napari_nca._layers import ORIGINAL_KEY, RESULT_KEY
from napari_nca._qt.segment_tab import WHOLE_VOLUME

pytestmark = pytest.mark.gui


def test_scan_opens_for_a_clinician(nca):  # noqa: F811
    viewer, _, image = nca
    data = image.data
    low, high = np.percentile(data, (0.5, 99.5))
    np.testing.assert_allclose(image.contrast_limits, (low, high), rtol=1e-5)  # not the scanner's full range
    assert [str(u) for u in image.units] == ["millimeter"] * 3
    assert [str(u) for u in viewer.dims.units] == ["millimeter"] * 3
    # the phantom is RAS: the sliders move through sagittal, coronal and axial slices
    assert viewer.dims.axis_labels == ("sagittal L→R", "coronal P→A", "axial I→S")


def test_segment_twice_keeps_what_the_user_painted(nca, qtbot, work_unit, tiny_model_path):  # noqa: F811
    viewer, panel, image = nca
    order = tuple(viewer.dims.order)
    qtbot.mouseClick(panel.segment.segment_button, Qt.LeftButton)
    wait_for(qtbot, panel.progress, work_unit)
    assert panel.progress.text == "done"
    seg = viewer.layers["phantom_seg"]
    assert isinstance(seg, Labels) and seg.data.shape == image.data.shape
    assert tuple(viewer.dims.order) == order, "the view jumped to another axis after Segment"
    # the scan's layers stay together: the result sits right above its scan
    assert viewer.layers.index(seg) == viewer.layers.index(image) + 1
    # the class under the cursor, in the class's colour
    value = int(seg.data[0, 0, 0])
    assert f"class: {['background', 'foreground'][value]}" in seg.get_status((0, 0, 0), world=True)["coordinates"]
    np.testing.assert_allclose(seg.colormap.map(np.array([1]))[0, :3], class_rgb(1), atol=1e-3)
    assert [str(u) for u in seg.units] == ["millimeter"] * 3
    # the volumes are the engine's, for this run
    expected = segment(load_model(tiny_model_path), image.metadata["mednca_volume"], seed=0, threads=1)
    np.testing.assert_array_equal(seg.data, expected.labels.array)
    for estimate in expected.volumes:
        assert estimate.text() in panel.segment.volumes.text()

    painted = np.array(seg.data)
    seg.data_setitem(tuple(np.array([[5], [5], [5]])), 1)  # the user paints one voxel
    painted[5, 5, 5] = 1
    panel.settings.seed.setValue(1)
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    again = viewer.layers["phantom_seg_2"]
    np.testing.assert_array_equal(seg.data, painted)  # the painted layer is untouched
    assert not seg.visible and again.visible  # the older result is kept, hidden under the new one
    assert again.metadata[RESULT_KEY]["settings"]["seed"] == 1
    np.testing.assert_array_equal(again.metadata[ORIGINAL_KEY], again.data)


def test_probability_maps_take_the_class_colours(nca, qtbot, work_unit):  # noqa: F811
    viewer, panel, _ = nca
    panel.segment.with_probabilities.setChecked(True)
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    prob = viewer.layers["phantom_prob_foreground"]
    assert isinstance(prob, Image) and prob.data.max() <= 1
    np.testing.assert_allclose(prob.colormap.map(np.array([1.0]))[0, :3], class_rgb(1), atol=1e-3)
    assert "foreground" in panel.segment.legend.text()
    panel.segment.segment()  # an image nobody paints on is replaced, not piled up
    wait_for(qtbot, panel.progress, work_unit)
    assert [layer.name for layer in viewer.layers if "_prob_" in layer.name] == ["phantom_prob_foreground"]


def test_growth_replay_is_captioned_and_hides_the_answer(nca, qtbot, work_unit, tmp_path, monkeypatch):  # noqa: F811
    viewer, panel, image = nca
    step = panel.segment
    step.segment()
    wait_for(qtbot, panel.progress, work_unit)
    seg = viewer.layers["phantom_seg"]

    viewer.dims.set_current_step(2, 20)
    qtbot.mouseClick(step.growth_button, Qt.LeftButton)
    wait_for(qtbot, panel.progress, work_unit)
    growth = viewer.layers["phantom_growth"]
    assert growth.rgb and growth.data.shape == (8, 36, 50, 1, 4)  # 4 + 4 steps of the chosen slice, in colour
    assert viewer.dims.axis_labels[0] == "NCA step"
    assert viewer.dims.nsteps[0] == 8 and viewer.dims.current_step[3] == 20
    assert not seg.visible, "the final answer is on screen while the growth replays"
    caption = viewer.canvas.overlays.text
    assert caption.visible and caption.text == "NCA growth: level 1 of 2 (coarse), step 1 of 4"
    shots = []
    for t in (0, 7):
        viewer.dims.set_current_step(0, t)
        shots.append(viewer.screenshot(canvas_only=True, flash=False))
    assert caption.text == "NCA growth: level 2 of 2 (full resolution), step 4 of 4"
    assert not np.array_equal(shots[0], shots[1]), "stepping through the growth changes nothing on screen"
    assert_not_blank(shots[1])

    gif = tmp_path / "growth.gif"
    assert step.export_animation(gif)
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 8
    mp4 = tmp_path / "growth.mp4"
    assert step.export_animation(mp4)
    assert len(list(iio.imiter(mp4, plugin="FFMPEG"))) == 8
    shown = []
    monkeypatch.setattr("napari_nca._qt.segment_tab.show_error", shown.append)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    assert not step.export_animation(tmp_path / "other.mp4")
    assert "imageio-ffmpeg" in shown[0] and not (tmp_path / "other.mp4").exists()

    step.growth_scope.setCurrentText(WHOLE_VOLUME)
    step.record_growth()
    wait_for(qtbot, panel.progress, work_unit, units=2)
    assert [layer.name for layer in viewer.layers if "growth" in layer.name] == ["phantom_growth"]
    assert viewer.layers["phantom_growth"].data.shape == (8, *image.data.shape, 4)
    assert not seg.visible
    viewer.layers.remove("phantom_growth")  # done replaying: the answer comes back, the caption goes
    assert seg.visible and not caption.visible


def test_saved_labels_lie_on_the_scan(nca, qtbot, work_unit, tmp_path, phantom_copy):  # noqa: F811
    viewer, panel, _ = nca
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    seg = viewer.layers["phantom_seg"]
    out = tmp_path / "phantom_seg.nii.gz"
    seg.save(str(out), plugin="napari-nca")
    np.testing.assert_allclose(nib.load(out).affine, nib.load(phantom_copy).affine)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), seg.data)
    shot = tmp_path / "segment.png"
    viewer.window.screenshot(str(shot), canvas_only=False)
    assert_not_blank(iio.imread(shot))


def test_cancel_stops_a_run_without_a_result(nca, qtbot, work_unit):  # noqa: F811
    viewer, panel, _ = nca
    panel.settings.steps.setValue(400)  # long enough to cancel midway
    worker = panel.segment.segment()
    panel.progress.cancel_button.click()
    wait_for(qtbot, panel.progress, work_unit, units=100)
    assert worker.abort_requested
    assert panel.progress.text == "cancelled"
    assert "phantom_seg" not in viewer.layers


def test_bad_input_becomes_a_notification(nca, qtbot, work_unit, monkeypatch):  # noqa: F811
    viewer, panel, image = nca
    shown = []
    monkeypatch.setattr("napari_nca._qt._common.show_error", shown.append)
    image.data = np.full(image.data.shape, np.nan, np.float32)
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    assert shown and "no finite value" in shown[0]
    assert panel.progress.text.startswith("failed")
    assert "phantom_seg" not in viewer.layers


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
