"""The viewer stays responsive while the engine works: a 50 ms Qt timer keeps firing during a segmentation
and during a fine-tuning run, which proves the widgets never block the Qt event loop."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gui_annotation import add_phantom, paint_slices, screenshot_shows_something
from gui_support import tiny_model_path  # noqa: F401 (a fixture)
from qtpy.QtCore import Qt, QTimer

from mednca.inference import torch_threads
from napari_nca._qt.finetune_widget import FinetuneWidget
from napari_nca._qt.segment_widget import SegmentWidget

pytestmark = pytest.mark.gui
TICK_MS = 50
LONGEST_GAP_S = 0.5


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

    def check(self, min_seconds: float) -> None:
        self.timer.stop()
        assert self.end is not None, "the worker did not finish"
        times = [t for t in self.times if t <= self.end] + [self.end]
        gaps = np.diff(times)
        span = times[-1] - times[0]
        assert span >= min_seconds, f"the run lasted only {span:.2f} s: too short to show anything"
        stalls = [f"{g:.2f} s at {times[i] - times[0]:.2f} s" for i, g in enumerate(gaps) if g >= LONGEST_GAP_S]
        assert not stalls, f"the event loop stalled: {stalls}"
        assert len(gaps) >= span / (TICK_MS / 1000) / 2, f"only {len(gaps)} ticks in {span:.1f} s"


@pytest.fixture
def viewer(make_napari_viewer, tiny_model_path):  # noqa: F811
    with torch_threads(1):
        yield make_napari_viewer(show=True)


def test_segmentation_keeps_the_viewer_responsive(qtbot, viewer, tiny_model_path, tmp_path):  # noqa: F811
    # a long scan, so the worker runs for a few seconds even with the tiny model
    scan = np.random.default_rng(0).normal(100, 20, (48, 48, 600)).astype(np.float32)
    image = viewer.add_image(scan, name="long scan")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image.value = image
    widget.picker.set_path(tiny_model_path)
    ticks = Ticks()
    ticks.start(widget.segment())
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=60_000)
    assert "long scan segmentation" in viewer.layers
    ticks.check(min_seconds=0.5)
    screenshot_shows_something(viewer, tmp_path / "segmented.png")


def test_finetuning_keeps_the_viewer_responsive(qtbot, viewer, tiny_model_path, tmp_path):  # noqa: F811
    image, truth = add_phantom(viewer)
    annotation = viewer.add_labels(truth * 0, name="annotation", scale=image.scale, translate=image.translate)
    paint_slices(annotation, truth, (14, 22))
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image.value, widget.labels.value = image, annotation
    widget.picker.set_path(tiny_model_path)
    widget.iterations.value = 100_000
    ticks = Ticks()
    ticks.start(widget.start())
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 3, timeout=30_000)
    qtbot.wait(1500)
    widget.progress.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.progress.busy, timeout=20_000)
    assert len(widget.plot.losses) >= 2, "the fine-tuning did not run during the measurement"
    ticks.check(min_seconds=1.5)
    screenshot_shows_something(viewer, tmp_path / "cancelled.png")
