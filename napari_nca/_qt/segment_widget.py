"""Segment dock widget: one engine call per button.

"Segment" runs ``mednca.inference.segment_iter`` and shows the labels (class names under the cursor) and,
optionally, the probability maps. "Record growth" keeps the frames of ``record_growth`` as a layer with a
leading step axis, so napari's dims slider and play button replay how the automaton grows its answer;
"Export animation" writes what the canvas shows at every step to a GIF or MP4.
"""

from __future__ import annotations

from functools import partial

import imageio.v3 as iio
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from mednca.inference import Progress, record_growth, segment_iter
from mednca.orientation import PLANE_NAMES, axis_codes, axis_of_plane, plane_of

from .._layers import layer_kwargs, scan_layers, show_slices_along
from ._common import ModelPicker, ProgressPanel, notify_error, run_worker, scan_and_model

GROWTH_KEY = "mednca_growth"
GROWTH_BUDGET = 2 * 1024**3  # bytes of growth frames kept for a whole volume
CLASS_COLORMAPS = ("magenta", "green", "cyan", "yellow", "red", "blue")
CURRENT_SLICE, WHOLE_VOLUME = "current slice", "whole volume"


def collect_growth(model, volume, *, slices, axis, seed, steps, fire_rate):
    """Worker generator: the frames of ``record_growth`` stacked as ``[steps, K, ...]`` (level 0 steps,
    then level 1 steps), yielding progress per frame."""
    total = sum(model.config.steps if steps is None else steps)
    frames = []
    growth = record_growth(model, volume, slices=slices, axis=axis, seed=seed, steps=steps, fire_rate=fire_rate)
    for frame in growth:
        frames.append(frame.probability)
        yield Progress(len(frames), total, "growth")
    return np.stack(frames)


class SegmentWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.picker = ModelPicker()
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.axis = ComboBox(label="slice plane", choices=list(PLANE_NAMES), value="axial",
                             tooltip="The plane the model segments slice by slice; it was trained on one plane "
                                     "(the model's own is chosen when you pick a model). The scan's orientation "
                                     "is read from its file, so this is anatomy, not an array axis.")
        self.steps = SpinBox(label="steps per level", min=1, max=500, value=16)
        self.fire_rate = FloatSpinBox(label="fire rate", min=0.0, max=0.95, step=0.05, value=0.5)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.with_probabilities = CheckBox(text="add probability maps", value=False)
        self.growth_scope = ComboBox(label="record growth of", choices=[CURRENT_SLICE, WHOLE_VOLUME])
        self.form = Container(widgets=[self.image, self.axis, self.steps, self.fire_rate, self.seed,
                                       self.with_probabilities, self.growth_scope])
        self.segment_button = QPushButton("Segment")
        self.growth_button = QPushButton("Record growth")
        self.export_button = QPushButton("Export animation…")
        self.progress = ProgressPanel()

        layout = QVBoxLayout(self)
        layout.addWidget(self.picker)
        layout.addWidget(self.form.native)
        layout.addWidget(self.segment_button)
        row = QHBoxLayout()
        row.addWidget(self.growth_button)
        row.addWidget(self.export_button)
        layout.addLayout(row)
        layout.addWidget(self.progress)
        layout.addStretch(1)

        self.segment_button.clicked.connect(self.segment)
        self.growth_button.clicked.connect(self.record_growth)
        self.export_button.clicked.connect(self._ask_export)
        self.picker.model_changed.connect(self._use_model_defaults)
        self._use_model_defaults()
        self.reset_choices()

    # napari calls this when layers are added, removed or renamed
    def reset_choices(self, *_):
        self.form.reset_choices()

    def _image_layers(self, _widget=None):
        return scan_layers(self.viewer)

    def _use_model_defaults(self, *_):
        """A model brings its own slice axis, steps and fire rate: show them as the starting values."""
        if self.picker.current_path() is None:  # nothing listed yet: the user will load one
            return
        try:
            model = self.picker.current_model()
        except Exception as exc:  # shown, with its type when it is not an input error
            notify_error(exc)
            return
        self.axis.value = plane_of(model.preprocessing.orientation, model.preprocessing.axis)
        self.steps.value = model.config.steps[0]
        self.fire_rate.value = model.config.fire_rate

    def _inputs(self):
        """(layer, volume, model, engine options) from the form; notifies and returns None on bad input."""
        layer = self.image.value
        chosen = scan_and_model(layer, self.picker)
        if chosen is None:
            return None
        volume, model = chosen
        # the model's own steps (which may differ per level) unless the user changed the number
        steps = None if self.steps.value == model.config.steps[0] else (int(self.steps.value),) * model.config.levels
        options = {
            "axis": axis_of_plane(axis_codes(volume.affine), self.axis.value),
            "seed": int(self.seed.value),
            "steps": steps,
            "fire_rate": float(self.fire_rate.value),
        }
        return layer, volume, model, options

    def segment(self):
        inputs = self._inputs()
        if inputs is None:
            return None
        layer, volume, model, options = inputs
        done = partial(self._show_segmentation, layer.name)
        return run_worker(self.progress, segment_iter, model, volume, on_return=done, text="segmenting…", **options)

    def _show_segmentation(self, name, seg):
        classes = ("background", *seg.class_names)
        features = pd.DataFrame({"index": np.arange(len(classes)), "class": classes})
        kwargs = layer_kwargs(seg.labels)
        kwargs["metadata"]["class_names"] = classes
        labels = self._put_layer(Labels, f"{name} segmentation", seg.labels.array, kwargs)
        labels.features = features
        if self.with_probabilities.value:
            for k, cls in enumerate(seg.class_names):
                kwargs = layer_kwargs(seg.labels.like(seg.probabilities[k]))
                kwargs["metadata"]["mednca_probability"] = cls
                self._put_layer(Image, f"{name} probability: {cls}", seg.probabilities[k],
                                {**kwargs, "contrast_limits": (0, 1), "blending": "additive",
                                 "colormap": CLASS_COLORMAPS[k % len(CLASS_COLORMAPS)]})
        show_slices_along(self.viewer, seg.axis)

    def _put_layer(self, kind, name, data, kwargs):
        """Update the layer called ``name`` in place (a re-run replaces its result), or add a new one."""
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            layer = self.viewer.layers[name]
            if layer.data.shape == data.shape:
                layer.data = data
                layer.metadata = kwargs.pop("metadata")
                for key, value in kwargs.items():
                    setattr(layer, key, value)
                return layer
            self.viewer.layers.remove(layer)
        return self.viewer.add_layer(kind(data, name=name, **kwargs))

    def current_slice(self, layer, axis: int) -> int:
        """Index along ``axis`` of ``layer`` that the viewer shows now."""
        point = np.asarray(self.viewer.dims.point)[-3:]
        index = round((point[axis] - layer.translate[-3:][axis]) / layer.scale[-3:][axis])
        return int(np.clip(index, 0, layer.data.shape[-3:][axis] - 1))

    def record_growth(self):
        inputs = self._inputs()
        if inputs is None:
            return None
        layer, volume, model, options = inputs
        axis = options["axis"]
        slices = [self.current_slice(layer, axis)] if self.growth_scope.value == CURRENT_SLICE else None
        n_frames = sum(options["steps"] or model.config.steps)
        n_bytes = n_frames * model.config.output_channels * int(np.prod(volume.shape)) * 4
        if slices is None and n_bytes > GROWTH_BUDGET:
            show_error(f"the growth of the whole volume would take {n_bytes / 1024**3:.1f} GiB of memory; "
                       "record the current slice instead")
            return None
        done = partial(self._show_growth, layer.name, volume, model.config.class_names, axis, slices)
        return run_worker(self.progress, collect_growth, model, volume, slices=slices, on_return=done,
                          text="recording growth…", **options)

    def _show_growth(self, name, volume, class_names, axis, slices, frames):
        """Frames ``[T, K, ...]`` become one layer per class with the step axis first."""
        kwargs = layer_kwargs(volume, leading=1)
        if slices is not None:  # one slice: place the thin layer where that slice lies
            translate = list(kwargs["translate"])
            translate[1 + axis] += slices[0] * volume.spacing[axis]
            kwargs["translate"] = tuple(translate)
        for k, cls in enumerate(class_names):
            kwargs["metadata"] = {GROWTH_KEY: {"axis": axis, "slices": slices, "class": cls}}
            self._put_layer(Image, f"{name} growth: {cls}", frames[:, k],
                            {**kwargs, "contrast_limits": (0, 1), "blending": "additive",
                             "colormap": CLASS_COLORMAPS[k % len(CLASS_COLORMAPS)]})
        show_slices_along(self.viewer, axis)
        step_axis = self.viewer.dims.ndim - 4
        self.viewer.dims.set_current_step(step_axis, frames.shape[0] - 1)
        if slices is not None:
            self.viewer.dims.set_current_step(step_axis + 1 + axis, slices[0])

    def growth_layers(self):
        return [layer for layer in self.viewer.layers if GROWTH_KEY in layer.metadata]

    def _ask_export(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export growth animation", "growth.gif",
                                              "GIF (*.gif);;MP4 video (*.mp4)")
        if path:
            self.export_animation(path)

    def export_animation(self, path, fps: int = 8) -> bool:
        """Write what the canvas shows at each growth step (image, overlays, colours) as GIF or MP4."""
        if not self.growth_layers():
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
        step_axis = self.viewer.dims.ndim - 4
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
