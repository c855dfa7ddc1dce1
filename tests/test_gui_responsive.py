"""The viewer stays responsive while the engine works, and a run never touches a panel that is gone.

A 50 ms Qt timer keeps firing on the GUI thread during a segmentation and during a fine-tuning run: the
panel never blocks the event loop. The longest pause allowed is ``LONGEST_GAP_S``, or, on a machine so
loaded that the timer already pauses longer with nothing running at all, a few times that measured pause:
the test checks what the panel adds, not how busy the machine is.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from gui_annotation import paint_slices, screenshot_shows_something
from gui_support import (  # noqa: F401 (fixtures)
    open_panel,
    phantom_copy,
    timeout_ms,
    tiny_model_path,
    wait_for,
    work_unit,
)
from qtpy.QtCore import Qt, QTimer

from mednca.datasets import phantom_paths
from mednca.volume import read_volume
from napari_nca._qt._common import alive
from napari_nca._qt._loss_plot import REDRAW_MS

pytestmark = pytest.mark.gui
TICK_MS = 50
LONGEST_GAP_S = 0.5
IDLE_FACTOR = 3  # allowed pause: this many times the longest pause with nothing running
IDLE_SECONDS = 1.0


class Ticks:
    """Times at which a ``TICK_MS`` timer fired on the GUI thread while a worker ran: from its start to the
    moment the worker thread itself says it finished (a direct connection, so showing the result on the GUI
    thread afterwards is not counted)."""

    def __init__(self):
        self.times: list[float] = []
        self.end = None
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))

    def start(self, worker) -> None:
        assert worker is not None
        worker.finished.connect(self._worker_done, Qt.DirectConnection)
        self.times.append(time.perf_counter())
        self.timer.start()

    def _worker_done(self):
        self.end = time.perf_counter()

    def check(self, min_seconds: float, longest_gap: float) -> float:
        """Asserts no pause reached ``longest_gap``; returns the measured span."""
        self.timer.stop()
        assert self.end is not None, "the worker did not finish"
        times = [t for t in self.times if t <= self.end] + [self.end]
        gaps = np.diff(times)
        span = times[-1] - times[0]
        assert span >= min_seconds, f"the run lasted only {span:.2f} s: too short to show anything"
        stalls = [f"{g:.2f} s at {times[i] - times[0]:.2f} s" for i, g in enumerate(gaps) if g >= longest_gap]
        assert not stalls, f"the event loop stalled (limit {longest_gap:.2f} s): {stalls}"
        assert len(gaps) >= span / (TICK_MS / 1000) / 2, f"only {len(gaps)} ticks in {span:.1f} s"
        return span


def longest_gap_allowed(qtbot) -> float:
    """``LONGEST_GAP_S``, or ``IDLE_FACTOR`` times the longest pause of the timer with nothing running."""
    times: list[float] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: times.append(time.perf_counter()))
    timer.start()
    qtbot.wait(int(IDLE_SECONDS * 1000))
    timer.stop()
    idle = float(np.diff(times).max()) if len(times) > 1 else IDLE_SECONDS
    return max(LONGEST_GAP_S, IDLE_FACTOR * idle)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer(show=True)


def test_segmentation_keeps_the_viewer_responsive(work_unit, tiny_model_path, qtbot, viewer, tmp_path,  # noqa: F811
                                                  monkeypatch):
    # a long scan, so the worker runs for a few seconds even with the tiny model
    scan = np.random.default_rng(0).normal(100, 20, (48, 48, 600)).astype(np.float32)
    viewer.add_image(scan, name="long scan")
    panel = open_panel(viewer, monkeypatch)
    panel.picker.set_path(tiny_model_path)
    limit = longest_gap_allowed(qtbot)
    ticks = Ticks()
    ticks.start(panel.segment.segment())
    wait_for(qtbot, panel.progress, work_unit, units=40)
    assert "long scan_seg" in viewer.layers
    ticks.check(min_seconds=0.5, longest_gap=limit)
    screenshot_shows_something(viewer, tmp_path / "segmented.png")


def test_finetuning_keeps_the_viewer_responsive_and_draws_little(work_unit, tiny_model_path, qtbot, viewer,  # noqa: F811
                                                                 tmp_path, monkeypatch):
    image_path, label_path = phantom_paths()
    viewer.open(str(image_path), plugin="napari-nca")
    panel = open_panel(viewer, monkeypatch)
    panel.picker.set_path(tiny_model_path)
    annotation = panel.finetune.new_layer()
    paint_slices(annotation, read_volume(label_path).array, (14, 22))
    panel.finetune.iterations.setValue(100_000)
    limit = longest_gap_allowed(qtbot)
    ticks = Ticks()
    ticks.start(panel.finetune.start())
    qtbot.waitUntil(lambda: len(panel.finetune.plot.losses) >= 3, timeout=timeout_ms(work_unit, 5))
    qtbot.wait(1500)
    panel.progress.cancel_button.click()
    wait_for(qtbot, panel.progress, work_unit)
    losses, draws = len(panel.finetune.plot.losses), panel.finetune.plot.draws
    assert losses >= 3, "the fine-tuning did not run during the measurement"
    span = ticks.check(min_seconds=1.5, longest_gap=limit)
    # the curve is redrawn on a timer, not at each of its points
    assert draws <= span / (REDRAW_MS / 1000) + 2, f"{draws} redraws for {losses} points in {span:.1f} s"
    screenshot_shows_something(viewer, tmp_path / "cancelled.png")


def test_a_run_outliving_its_panel_touches_nothing(work_unit, phantom_copy, tiny_model_path,  # noqa: F811
                                                   qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(phantom_copy), plugin="napari-nca")
    panel = open_panel(viewer, monkeypatch)
    panel.picker.set_path(tiny_model_path)
    panel.settings.steps.setValue(400)  # a long run
    progress = panel.progress
    worker = panel.segment.segment()
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    viewer.close()  # the window and the panel in it are deleted while the worker runs
    qtbot.waitUntil(lambda: not alive(progress), timeout=10_000)
    # its late signals must reach no deleted widget (pytest-qt fails the test on an error in a slot)
    qtbot.waitUntil(lambda: bool(finished), timeout=timeout_ms(work_unit, 100))
    assert worker.abort_requested, "closing the panel did not stop its run"
