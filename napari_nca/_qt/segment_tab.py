"""Segment step: one ``segment_iter`` call per press, and the growth replay of ``record_growth``.

Every run adds a new Labels layer (``<scan>_seg``, then ``<scan>_seg_2``...): nothing a user painted on an
earlier result is ever written over. The layer shows the class names under the cursor, the class colours
of the legend, and keeps the labels as the engine gave them, so the slices a user corrects can be told
apart later. The volumes of this run in mL are shown as the engine computes them.

"Record growth" replays how the automaton grows its answer: one colour image per step (each voxel in its
most probable class's colour, see ``growth_rgba``) under the slider "NCA step", with a
caption naming the level and step. The results are hidden while the growth is on screen (the answer would
otherwise be visible from step 0) and come back when the growth layer is hidden or removed.
"""

from __future__ import annotations

from functools import partial

import imageio.v3 as iio
import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from mednca.inference import Progress, record_growth, segment_iter

from .._colours import growth_rgba, labels_colormap, legend_html, probability_colormap
from .._layers import (
    ORIGINAL_KEY,
    RESULT_KEY,
    add_result,
    current_index,
    layer_kwargs,
    results_of,
    show_slices_along,
    versioned_name,
)
from ._common import in_threads, notify_error, run_worker

GROWTH_BUDGET = 2 * 1024**3  # bytes of growth frames kept for a whole volume
CURRENT_SLICE, WHOLE_VOLUME = "current slice", "whole volume"
HIDDEN_DURING_GROWTH = ("segmentation", "probability", "uncertainty")


def collect_growth(model, volume, *, slices, axis, seed, steps, fire_rate, threads):
    """Worker generator: the frames of ``record_growth`` as colour images ``[steps, ..., 4]`` (level 0 steps,
    then level 1 steps) and the (level, step) of each, yielding progress per frame."""
    return (yield from in_threads(_growth_frames(model, volume, slices, axis, seed, steps, fire_rate), threads))


def _growth_frames(model, volume, slices, axis, seed, steps, fire_rate):
    total = sum(model.config.steps if steps is None else steps)
    frames, when = [], []
    for frame in record_growth(model, volume, slices=slices, axis=axis, seed=seed, steps=steps, fire_rate=fire_rate):
        frames.append(growth_rgba(frame.probability))
        when.append((frame.level, frame.step))
        yield Progress(len(frames), total, "growth")
    return np.stack(frames), when


def caption(level: int, step: int, steps_per_level: list[int]) -> str:
    """The replay's caption for one frame, e.g. "NCA growth: level 1 of 2 (coarse), step 5 of 16"."""
    levels = len(steps_per_level)
    kind = "coarse" if level < levels - 1 else "full resolution"
    return (f"NCA growth: level {level + 1} of {levels} ({kind}), "
            f"step {step + 1} of {steps_per_level[level]}")


class SegmentStep(QWidget):
    def __init__(self, panel):
        super().__init__()
        self.panel = panel
        self.viewer = panel.viewer
        intro = QLabel("Segment the scan with the model. Each run adds a new layer: nothing you painted is "
                       "changed.")
        intro.setWordWrap(True)
        self.segment_button = QPushButton("Segment")
        self.segment_button.setToolTip("Segment the chosen scan with the chosen model (adds a new "
                                       "segmentation layer)")
        self.with_probabilities = QCheckBox("also add probability maps")
        self.with_probabilities.setToolTip("Add one image per structure showing how sure the model is of each "
                                           "voxel, in the structure's colour")
        self.legend = QLabel("")
        self.legend.setTextFormat(Qt.RichText)
        self.legend.setToolTip("The colour of each structure, the same in every layer napari-nca makes")
        self.volumes = QLabel("")
        self.volumes.setWordWrap(True)
        self.growth_scope = QComboBox()
        self.growth_scope.addItems([CURRENT_SLICE, WHOLE_VOLUME])
        self.growth_scope.setToolTip("Record the growth of the slice on screen (fast), or of the whole scan")
        self.growth_button = QPushButton("Record growth")
        self.growth_button.setToolTip("Watch the model grow its answer step by step: play it with the "
                                      "'NCA step' slider")
        self.export_button = QPushButton("Export animation…")
        self.export_button.setToolTip("Save the growth replay as a GIF or MP4 animation")

        growth = QHBoxLayout()
        growth.addWidget(self.growth_button)
        growth.addWidget(self.export_button)
        scope = QFormLayout()
        scope.addRow("growth of", self.growth_scope)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.segment_button)
        layout.addWidget(self.with_probabilities)
        layout.addWidget(self.legend)
        layout.addWidget(self.volumes)
        layout.addLayout(scope)
        layout.addLayout(growth)
        layout.addStretch(1)

        self._hidden: list = []  # results hidden while a growth replay is on screen
        self._growth = None
        self.segment_button.clicked.connect(self.segment)
        self.growth_button.clicked.connect(self.record_growth)
        self.export_button.clicked.connect(self._ask_export)
        self.viewer.dims.events.current_step.connect(self._update_caption)

    def show_legend(self, class_names) -> None:
        self.legend.setText(legend_html(class_names))

    def segment(self):
        chosen = self.panel.scan_volume_model()
        if chosen is None:
            return None
        scan, volume, model = chosen
        options = self.panel.options(volume, model)
        done = partial(self._show_segmentation, scan, self.panel.picker.current_path(), options)
        return run_worker(self.panel.progress, segment_iter, model, volume, threads=self.panel.threads,
                          on_return=done, text="segmenting…", **options)

    def _show_segmentation(self, scan, model_path, options, seg):
        classes = ("background", *seg.class_names)
        for earlier in results_of(self.viewer, scan.name, "segmentation"):
            earlier.visible = False  # kept, untouched, under the new one
        kwargs = layer_kwargs(seg.labels)
        kwargs["metadata"].update({
            "class_names": classes,
            RESULT_KEY: {"kind": "segmentation", "scan": scan.name, "model": model_path, "settings": options},
            ORIGINAL_KEY: seg.labels.array.copy(),
        })
        labels = Labels(seg.labels.array, name=versioned_name(self.viewer, f"{scan.name}_seg"),
                        colormap=labels_colormap(len(seg.class_names)),
                        features=pd.DataFrame({"index": np.arange(len(classes)), "class": classes}), **kwargs)
        add_result(self.viewer, scan, labels)
        if self.with_probabilities.isChecked():
            for k, cls in enumerate(seg.class_names):
                self._show_probability(scan, seg, k, cls)
        self.show_legend(seg.class_names)
        self.volumes.setText(f"Volumes of {labels.name}: " + ", ".join(v.text() for v in seg.volumes)
                             + ". Check quality gives their spread across runs.")

    def _show_probability(self, scan, seg, k, cls):
        """A probability map is an image nobody paints on: a re-run replaces the earlier one of its class."""
        kwargs = layer_kwargs(seg.labels.like(seg.probabilities[k]))
        kwargs["metadata"][RESULT_KEY] = {"kind": "probability", "scan": scan.name, "class": cls}
        earlier = [layer for layer in results_of(self.viewer, scan.name, "probability")
                   if layer.metadata[RESULT_KEY]["class"] == cls]
        layer = Image(seg.probabilities[k], name=f"{scan.name}_prob_{cls}", contrast_limits=(0, 1),
                      colormap=probability_colormap(k + 1), blending="translucent", **kwargs)
        add_result(self.viewer, scan, layer, replaces=earlier[-1] if earlier else None)

    # ---------------------------------------------------------------------------------------------- growth

    def record_growth(self):
        chosen = self.panel.scan_volume_model()
        if chosen is None:
            return None
        scan, volume, model = chosen
        options = self.panel.options(volume, model)
        axis = options["axis"]
        slices = [current_index(self.viewer, scan, axis)] if self.growth_scope.currentText() == CURRENT_SLICE else None
        n_frames = sum(options["steps"] or model.config.steps)
        n_bytes = n_frames * 4 * int(np.prod(volume.shape))
        if slices is None and n_bytes > GROWTH_BUDGET:
            show_error(f"the growth of the whole volume would take {n_bytes / 1024**3:.1f} GiB of memory; "
                       "record the current slice instead")
            return None
        steps = list(options["steps"] or model.config.steps)
        done = partial(self._show_growth, scan, volume, axis, slices, steps)
        return run_worker(self.panel.progress, collect_growth, model, volume, slices=slices,
                          threads=self.panel.threads, on_return=done, text="recording growth…", **options)

    def _show_growth(self, scan, volume, axis, slices, steps, result):
        frames, when = result
        kwargs = layer_kwargs(volume, leading=("NCA step",))
        if slices is not None:  # one slice: place the thin layer where that slice lies
            translate = list(kwargs["translate"])
            translate[1 + axis] += slices[0] * volume.spacing[axis]
            kwargs["translate"] = tuple(translate)
        kwargs["metadata"][RESULT_KEY] = {"kind": "growth", "scan": scan.name, "frames": when,
                                          "steps": steps, "axis": axis, "slices": slices}
        earlier = results_of(self.viewer, scan.name, "growth")
        self._restore_results()
        layer = Image(frames, rgb=True, name=f"{scan.name}_growth", **kwargs)
        add_result(self.viewer, scan, layer, replaces=earlier[-1] if earlier else None)
        self._hide_results(scan.name)
        self._growth = layer
        layer.events.visible.connect(self._growth_visibility)
        self.viewer.layers.events.removed.connect(self._growth_removed)
        show_slices_along(self.viewer, axis)  # a slice's growth is seen in its own plane
        if slices is not None:
            self.viewer.dims.set_current_step(self.viewer.dims.ndim - 3 + axis, slices[0])
        self.viewer.dims.set_current_step(self.step_axis, 0)  # the replay starts from the first step
        self._update_caption()

    @property
    def step_axis(self) -> int:
        return self.viewer.dims.ndim - 4

    def _hide_results(self, scan_name):
        shown = [layer for kind in HIDDEN_DURING_GROWTH for layer in results_of(self.viewer, scan_name, kind)
                 if layer.visible]
        for layer in shown:
            layer.visible = False
        self._hidden += shown

    def _restore_results(self):
        for layer in self._hidden:
            if layer in self.viewer.layers:
                layer.visible = True
        self._hidden = []

    def _growth_visibility(self, event=None):
        if self._growth is None:
            return
        if self._growth.visible:
            self._hide_results(self._growth.metadata[RESULT_KEY]["scan"])
        else:
            self._restore_results()
        self._update_caption()

    def _growth_removed(self, event):
        if event.value is self._growth:
            self._growth = None
            self._restore_results()
            self.viewer.layers.events.removed.disconnect(self._growth_removed)
            self._update_caption()

    def _update_caption(self, *_):
        overlay = self.viewer.canvas.overlays.text
        growth = self._growth
        if growth is None or not growth.visible or self.viewer.dims.ndim < 4:
            if overlay.text.startswith("NCA growth"):
                overlay.visible = False
            return
        info = growth.metadata[RESULT_KEY]
        t = min(self.viewer.dims.current_step[self.step_axis], len(info["frames"]) - 1)
        level, step = info["frames"][t]
        overlay.text = caption(level, step, info["steps"])
        overlay.position = "top_left"
        overlay.visible = True

    def _ask_export(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export growth animation", "growth.gif",
                                              "GIF (*.gif);;MP4 video (*.mp4)")
        if path:
            self.export_animation(path)

    def export_animation(self, path, fps: int = 8) -> bool:
        """Write what the canvas shows at each growth step (image, colours, caption) as GIF or MP4."""
        if self._growth is None or self._growth not in self.viewer.layers:
            show_info("Record growth first: the animation replays the recorded steps.")
            return False
        path = str(path)
        mp4 = path.lower().endswith(".mp4")
        if mp4:
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                show_error("MP4 export needs imageio-ffmpeg (pip install imageio-ffmpeg); GIF works without it")
                return False
        self._growth.visible = True
        step_axis = self.step_axis
        before = self.viewer.dims.current_step[step_axis]
        frames = []
        for t in range(self.viewer.dims.nsteps[step_axis]):
            self.viewer.dims.set_current_step(step_axis, t)
            frames.append(self.viewer.screenshot(canvas_only=True, flash=False)[..., :3])
        self.viewer.dims.set_current_step(step_axis, before)
        try:
            if mp4:  # yuv420p video needs even sizes
                h, w = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
                iio.imwrite(path, [f[:h, :w] for f in frames], plugin="FFMPEG", fps=fps, macro_block_size=1)
            else:
                iio.imwrite(path, frames, duration=1000 / fps, loop=0)
        except (OSError, ValueError, RuntimeError) as exc:
            notify_error(exc)
            return False
        show_info(f"animation written to {path}")
        return True
