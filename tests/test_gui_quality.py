"""The Quality widget driven as a user would: compute the quality map of a scan, read the NQM, click a slice
to check and see the viewer move there."""

from __future__ import annotations

import imageio.v3 as iio
import pytest
from gui_support import assert_not_blank, tiny_model_path, wait_for  # noqa: F401
from napari.layers import Image, Labels
from qtpy.QtCore import Qt

pytestmark = pytest.mark.gui


def test_quality_map_lists_slices_and_moves_the_viewer(make_napari_viewer, qtbot, tmp_path, tiny_model_path):  # noqa: F811
    viewer = make_napari_viewer(show=True)
    image, reference = viewer.open_sample("napari-nca", "phantom")
    assert isinstance(reference, Labels) and reference.data.shape == image.data.shape
    _, widget = viewer.window.add_plugin_dock_widget("napari-nca", "Quality")
    widget.picker.set_path(tiny_model_path)
    widget.runs.value = 3

    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    wait_for(qtbot, widget.progress)
    std = viewer.layers["phantom uncertainty: foreground"]
    assert isinstance(std, Image) and std.data.shape == image.data.shape
    assert std.colormap.name == "inferno" and std.blending == "additive"
    report = widget.report
    assert f"NQM {report.nqm:.3f} over 3 runs" in widget.summary.text()
    assert widget.slices.count() >= 1
    assert widget.image.choices == (image,)  # neither the reference labels nor the map itself
    assert widget.figure.axes and len(widget.figure.axes[0].lines[0].get_ydata()) == image.data.shape[2]

    # the last listed slice, so the click must move the viewer away from where it was
    item = widget.slices.item(widget.slices.count() - 1)
    target = item.data(Qt.UserRole)
    viewer.dims.set_current_step(2, 0 if target != 0 else 1)
    rect = widget.slices.visualItemRect(item)
    qtbot.mouseClick(widget.slices.viewport(), Qt.LeftButton, pos=rect.center())
    assert viewer.dims.current_step[2] == target
    assert tuple(viewer.dims.displayed) == (0, 1)

    shot = tmp_path / "quality.png"
    viewer.window.screenshot(str(shot), canvas_only=False)
    assert_not_blank(iio.imread(shot))


def test_quality_without_an_image_says_what_to_do(make_napari_viewer, tiny_model_path, monkeypatch):  # noqa: F811
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-nca", "Quality")
    shown = []
    monkeypatch.setattr("napari_nca._qt._common.show_info", shown.append)
    assert widget.compute() is None
    assert shown and "Open a scan" in shown[0]
    assert widget.report is None and widget.slices.count() == 0
