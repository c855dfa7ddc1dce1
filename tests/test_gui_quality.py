"""The Check quality step driven as a user would: the engine's verdict in its colour, the NQM explained,
volumes with their spread, a dark plot of the per-slice scores, the slices worth checking (a click goes
there), and the verdict written on the segmentation it is about."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from gui_support import (  # noqa: F401 (fixtures)
    assert_not_blank,
    nca,
    open_panel,
    phantom_copy,
    tiny_model,
    tiny_model_path,
    wait_for,
    work_unit,
)
from matplotlib.colors import to_hex
from napari.layers import Image
from qtpy.QtCore import Qt

from mednca.registry import SHIPPED_DIR, save_user_model
from napari_nca._colours import BACKGROUND, VERDICT_COLOURS
from napari_nca._layers import RESULT_KEY
from napari_nca._qt.quality_tab import FAILED_MARK

pytestmark = pytest.mark.gui


def check(qtbot, panel, work_unit, runs: int, units: float):  # noqa: F811
    panel.tabs.setCurrentWidget(panel.quality)
    panel.quality.runs.setValue(runs)
    qtbot.mouseClick(panel.quality.run_button, Qt.LeftButton)
    wait_for(qtbot, panel.progress, work_unit, units=units)
    assert panel.progress.text == "done"
    return panel.quality.report


def shows_the_report(panel, report) -> None:
    """Every number on screen is the report's."""
    step = panel.quality
    assert f"background-color: {VERDICT_COLOURS[report.verdict.level]}" in step.verdict.styleSheet()
    assert report.verdict.headline.lower() in step.verdict.text().lower()
    for reason in report.verdict.reasons:
        assert reason in step.verdict.text()
    assert f"NQM {report.nqm:.3f}: the share of the segmentation on which the {report.runs} runs disagree" \
        in step.nqm.text()
    for v in report.volumes:
        assert f"{v.ml:.2f}" in step.volumes.text() and f"{v.sd_ml:.2f}" in step.volumes.text()
    axes = step.plot.figure.axes[0]
    assert to_hex(axes.get_facecolor()) == BACKGROUND and to_hex(step.plot.figure.get_facecolor()) == BACKGROUND
    np.testing.assert_allclose(axes.lines[0].get_ydata(), report.slice_scores)
    listed = [step.slices.item(i).data(Qt.UserRole) for i in range(step.slices.count())]
    assert listed == report.flagged_slices  # only the slices the engine flags, worst first


@pytest.fixture
def blind_model_path(tiny_model_path):  # noqa: F811
    """A model that segments nothing (all weights zero): the engine judges that "likely failed" whatever its
    calibrated limits."""
    model = tiny_model()
    with torch.no_grad():
        for weights in model.parameters():
            weights.zero_()
    return save_user_model(model, "blind")


def test_a_failed_segmentation_is_marked_red(nca, blind_model_path, qtbot, work_unit):  # noqa: F811
    viewer, panel, _ = nca
    panel.picker.set_path(blind_model_path)
    report = check(qtbot, panel, work_unit, runs=3, units=3)
    assert report.verdict.level == "fail" and report.verdict.reasons == ("nothing was segmented",)
    shows_the_report(panel, report)
    # no segmentation was on screen: the quality run's own labels become the judged layer
    [seg] = [layer for layer in viewer.layers if layer.metadata.get(RESULT_KEY, {}).get("kind") == "segmentation"]
    assert seg.name == "phantom_seg" + FAILED_MARK and seg is panel.quality.marked
    assert seg.metadata[RESULT_KEY]["verdict"] == {"level": "fail", "reasons": ["nothing was segmented"]}
    assert panel.quality.slices_title.text() == "No slice needs checking" and not panel.quality.slices.isVisible()


def test_slices_worth_checking_are_listed_and_a_click_goes_there(phantom_copy, work_unit, make_napari_viewer,  # noqa: F811
                                                                 qtbot, monkeypatch, tmp_path):
    # the shipped hippocampus model on the synthetic phantom, which looks nothing like an MRI: unsure slices
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(phantom_copy), plugin="napari-nca")
    panel = open_panel(viewer, monkeypatch)
    panel.picker.set_path(SHIPPED_DIR / "hippocampus.safetensors")
    report = check(qtbot, panel, work_unit, runs=3, units=60)
    assert report.verdict.level != "ok" and report.flagged_slices
    shows_the_report(panel, report)
    seg = panel.quality.marked
    assert seg.name == "phantom_seg" + (FAILED_MARK if report.verdict.level == "fail" else "")
    for cls in report.class_names:
        std = viewer.layers[f"phantom_std_{cls}"]
        assert isinstance(std, Image) and std.data.shape == image.data.shape and std.colormap.name == "inferno"
    assert image in panel.scan._layers and len(panel.scan._layers) == 1  # computed maps are not scans

    target = report.flagged_slices[-1]
    viewer.dims.set_current_step(2, 0 if target != 0 else 1)
    item = panel.quality.slices.item(panel.quality.slices.count() - 1)
    rect = panel.quality.slices.visualItemRect(item)
    qtbot.mouseClick(panel.quality.slices.viewport(), Qt.LeftButton, pos=rect.center())
    assert viewer.dims.current_step[2] == target
    assert tuple(viewer.dims.displayed) == (0, 1)  # the view shows the plane the slices were scored in
    shot = tmp_path / "quality.png"
    viewer.window.screenshot(str(shot), canvas_only=False)
    assert_not_blank(iio.imread(shot))


def test_the_verdict_goes_on_the_segmentation_it_is_about(nca, qtbot, work_unit):  # noqa: F811
    viewer, panel, _ = nca
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    seg = viewer.layers["phantom_seg"]
    report = check(qtbot, panel, work_unit, runs=3, units=3)
    shows_the_report(panel, report)
    assert panel.quality.marked is seg  # same model, same settings: no second layer
    assert seg.metadata[RESULT_KEY]["verdict"]["level"] == report.verdict.level
    assert seg.name == ("phantom_seg" + FAILED_MARK if report.verdict.level == "fail" else "phantom_seg")

    panel.settings.seed.setValue(3)  # other settings: another segmentation than the one on screen
    check(qtbot, panel, work_unit, runs=3, units=3)
    assert panel.quality.marked is not seg and panel.quality.marked.name.startswith("phantom_seg_2")


def test_quality_without_a_scan_says_what_to_do(make_napari_viewer, tiny_model_path, monkeypatch):  # noqa: F811
    viewer = make_napari_viewer(show=True)
    panel = open_panel(viewer, monkeypatch)
    shown = []
    monkeypatch.setattr("napari_nca._qt.panel.show_info", shown.append)
    assert panel.quality.compute() is None
    assert shown and "Open a scan" in shown[0]
    assert panel.quality.report is None and panel.quality.slices.count() == 0
