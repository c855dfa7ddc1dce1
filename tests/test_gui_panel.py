"""The napari-nca panel as a whole: one dock widget for the loop, fitting a laptop screen beside the canvas,
every control explained, the model's own settings by default with a warning and a way back."""

from __future__ import annotations

import imageio.v3 as iio
import pytest
from gui_support import (  # noqa: F401 (fixtures)
    assert_not_blank,
    nca,
    open_panel,
    phantom_copy,
    tiny_model_path,
    wait_for,
    work_unit,
)
from npe2 import PluginManifest
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QApplication,
    QComboBox,
    QLineEdit,
    QTabBar,
)

from mednca.registry import load_model
from napari_nca._qt._common import LayerCombo, ModelPicker
from napari_nca._qt.panel import NCAPanel

pytestmark = pytest.mark.gui
# a maximised window on a 1366x768 screen: the taskbar and the title bar take about 70 px
SCREEN = (1366, 700)
MIN_CANVAS = (640, 480)


def test_napari_nca_opens_one_panel_with_every_step(make_napari_viewer, monkeypatch):
    manifest = PluginManifest.from_distribution("napari-nca")
    assert len(manifest.contributions.widgets) == 1  # `napari -w napari-nca` opens the panel, nothing else
    viewer = make_napari_viewer(show=True)
    panel = open_panel(viewer, monkeypatch)  # by plugin name alone, as `napari -w napari-nca` does
    assert isinstance(panel, NCAPanel)
    assert [panel.tabs.tabText(i) for i in range(panel.tabs.count())] == ["Segment", "Quality", "Fine-tune", "Train"]
    # one scan choice and one model choice, shared by every step
    assert panel.findChildren(ModelPicker) == [panel.picker]
    scan_choices = [c for c in panel.findChildren(LayerCombo) if c is not panel.finetune.labels]
    assert scan_choices == [panel.scan]


def _fits(viewer, panel) -> None:
    QApplication.processEvents()
    scroll = panel.scroll
    content = scroll.widget()
    assert scroll.verticalScrollBar().maximum() == 0, (
        f"the {panel.tabs.tabText(panel.tabs.currentIndex())} step needs scrolling: "
        f"{content.height()} px of content in {scroll.viewport().height()} px")
    assert content.minimumSizeHint().width() <= scroll.viewport().width(), "the panel is cut off on the right"
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= MIN_CANVAS[0] and canvas.height() >= MIN_CANVAS[1], (
        f"the canvas is squeezed to {canvas.width()}x{canvas.height()}")


def test_panel_fits_a_1366x768_screen_beside_the_canvas(nca, qtbot, work_unit, tmp_path):  # noqa: F811
    viewer, panel, _ = nca
    window = viewer.window._qt_window
    window.resize(*SCREEN)
    qtbot.waitUntil(lambda: (window.width(), window.height()) == SCREEN)
    for i in range(panel.tabs.count()):
        panel.tabs.setCurrentIndex(i)
        _fits(viewer, panel)
    # the tallest readout: the quality step with a verdict, its reasons, volumes, plot and slices
    panel.tabs.setCurrentWidget(panel.quality)
    panel.quality.runs.setValue(3)
    panel.quality.compute()
    wait_for(qtbot, panel.progress, work_unit, units=3)
    assert panel.quality.report is not None
    _fits(viewer, panel)
    shot = tmp_path / "panel.png"
    viewer.window.screenshot(str(shot), canvas_only=False)
    assert_not_blank(iio.imread(shot))


def _part_of_another_control(widget) -> bool:
    """The text field of a spin box, the list a combo box pops up, a tab bar's scroll arrows."""
    parent = widget.parent()
    while parent is not None:
        if isinstance(parent, QAbstractSpinBox | QComboBox | QTabBar):
            return True
        parent = parent.parent()
    return False


def test_every_input_control_has_a_tooltip(nca):  # noqa: F811
    _, panel, _ = nca
    controls = [
        w for w in panel.findChildren((QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit, QAbstractItemView))
        if not _part_of_another_control(w)
    ]
    assert len(controls) > 25
    missing = [f"{type(w).__name__} {getattr(w, 'text', lambda: '')()!r}" for w in controls if not w.toolTip().strip()]
    assert not missing, f"controls without a tooltip: {missing}"
    tabs = panel.tabs
    assert all(tabs.tabToolTip(i) for i in range(tabs.count()))


def test_advanced_settings_start_folded_at_the_models_own_and_warn_when_changed(nca, tiny_model_path):  # noqa: F811
    _, panel, _ = nca
    model = load_model(tiny_model_path)
    settings = panel.settings
    assert not panel.advanced.expanded and not settings.isVisible()
    assert settings.plane.currentText() == "axial"  # the tiny model slices RAS axis 2
    assert settings.steps.value() == model.config.steps[0] and settings.fire_rate.value() == model.config.fire_rate
    assert not panel.warning.isVisible()

    panel.advanced.set_expanded(True)
    assert settings.isVisible()
    settings.plane.setCurrentText("coronal")
    settings.fire_rate.setValue(0.9)
    assert panel.warning.isVisible()
    assert "slice plane coronal (the model learned axial)" in panel.warning.text()
    assert "fire rate 0.90" in panel.warning.text()
    panel.warning.linkActivated.emit("reset")  # the warning's own "Reset" link
    assert not panel.warning.isVisible()
    assert settings.plane.currentText() == "axial" and settings.fire_rate.value() == model.config.fire_rate
    settings.steps.setValue(9)
    settings.reset_button.click()
    assert settings.steps.value() == model.config.steps[0] and not panel.warning.isVisible()
