"""Fine-tune dock widget: adapt a model to one scan from a few slices the user corrected or painted.

The run is ``mednca.training.finetune_iter`` on the annotated slices, then ``segment_iter`` with the adapted
model, in one worker: the loss curve grows while it trains, and the new segmentation lands in its own layer
beside the previous one for comparison. The engine hands back a new model only at the end, so Cancel leaves
the chosen model as it was. "Keep" saves the adapted model to the user's model folder, where every model
list of the plugin finds it; "Revert" drops it and its layer.
"""

from __future__ import annotations

from functools import partial

import numpy as np

# torch.optim imports torch._dynamo (about 800 modules) when the first optimiser is made; done in the worker
# thread, that import holds Python's lock long enough to freeze the viewer for up to a second, so it happens
# here, when the widget is loaded, instead.
import torch._dynamo  # noqa: F401
from magicgui.widgets import ComboBox, Container, FloatSpinBox, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from mednca.errors import MedNCAError
from mednca.inference import segment_iter, slice_axis
from mednca.registry import save_user_model
from mednca.training import annotated_slices, finetune_iter

from .._layers import layer_kwargs, show_slices_along, volume_from_layer
from ._common import ModelPicker, ProgressPanel, notify_error, refresh_model_lists, run_worker
from ._loss_plot import LossPlot

TUNED_SUFFIX = " segmentation (fine-tuned)"


def finetune_and_segment(model, volume, labels, *, iterations, lr, seed):
    """Worker generator: fine-tune, then segment the scan with the adapted model; returns
    ``(adapted model, FinetuneReport, Segmentation)``."""
    tuned, report = yield from finetune_iter(model, volume, labels, iterations=iterations, lr=lr, seed=seed)
    segmentation = yield from segment_iter(tuned, volume, seed=seed)
    return tuned, report, segmentation


def format_dice(dice: dict[str, float]) -> str:
    parts = [f"{name} {value:.3f}" for name, value in dice.items() if name != "whole"]
    return f"{dice.get('whole', float('nan')):.3f}" + (f" ({', '.join(parts)})" if len(parts) > 1 else "")


class FinetuneWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.picker = ModelPicker()
        self.image = ComboBox(label="image", choices=self._layers_of(Image))
        self.labels = ComboBox(label="annotation", choices=self._layers_of(Labels),
                               tooltip="Labels layer you corrected or painted; only its labelled slices are used")
        self.iterations = SpinBox(label="iterations", min=1, max=100_000, value=100)
        self.lr = FloatSpinBox(label="learning rate", min=1e-6, max=1e-1, step=1e-4, value=5e-4)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.form = Container(widgets=[self.image, self.labels, self.iterations, self.lr, self.seed])
        self.lr.native.setDecimals(6)
        self.slices_label = QLabel("")
        self.slices_label.setWordWrap(True)
        self.start_button = QPushButton("Fine-tune")
        self.progress = ProgressPanel()
        self.plot = LossPlot(dice_label="")
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name of the adapted model")
        self.keep_button = QPushButton("Keep")
        self.keep_button.setToolTip("Save the adapted model to your model folder")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Discard the adapted model and its segmentation layer")

        layout = QVBoxLayout(self)
        layout.addWidget(self.picker)
        layout.addWidget(self.form.native)
        layout.addWidget(self.slices_label)
        layout.addWidget(self.start_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.result_label)
        row = QHBoxLayout()
        row.addWidget(self.name_edit, 1)
        row.addWidget(self.keep_button)
        row.addWidget(self.revert_button)
        layout.addLayout(row)
        layout.addStretch(1)

        self.adapted = None  # (model, report, layer name) of the last run, until kept or reverted
        self.worker = None
        self._watched = None
        self._set_result_buttons(False)
        self.start_button.clicked.connect(self.start)
        self.keep_button.clicked.connect(self.keep)
        self.revert_button.clicked.connect(self.revert)
        self.picker.model_changed.connect(self.show_annotated_slices)
        self.labels.changed.connect(self._watch_labels)
        self.reset_choices()

    # napari calls this when layers are added, removed or renamed
    def reset_choices(self, *_):
        self.form.reset_choices()
        self._watch_labels()

    def _layers_of(self, kind):
        def choices(_widget=None):
            return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, kind)]
        return choices

    def _watch_labels(self, *_):
        """Follow painting on the chosen annotation layer, so the list of annotated slices stays current."""
        layer = self.labels.value
        if layer is self._watched:
            self.show_annotated_slices()
            return
        if self._watched is not None:
            self._watched.events.paint.disconnect(self.show_annotated_slices)
            self._watched.events.data.disconnect(self.show_annotated_slices)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self.show_annotated_slices)
            layer.events.data.connect(self.show_annotated_slices)
        self.show_annotated_slices()

    def annotated(self) -> tuple[int, list[int]] | None:
        """(scan axis the model slices, annotated slice indices) for the current choices, None when a choice
        is missing."""
        layer, image = self.labels.value, self.image.value
        if layer is None or image is None or self.picker.current_path() is None:
            return None
        # the scan's geometry decides the slice axis: a freshly painted layer carries none of its own
        axis = slice_axis(self.picker.current_model(), volume_from_layer(image))
        return axis, annotated_slices(np.asarray(layer.data), axis)

    def show_annotated_slices(self, *_):
        try:
            found = self.annotated()
        except MedNCAError as exc:
            self.slices_label.setText(str(exc))
            return
        if found is None:
            self.slices_label.setText("Add a Labels layer and paint the structure on a few slices.")
            return
        axis, slices = found
        if not slices:
            self.slices_label.setText(f"No annotated slice yet along axis {axis}: paint a few slices.")
        else:
            listed = ", ".join(map(str, slices[:20])) + (" …" if len(slices) > 20 else "")
            self.slices_label.setText(f"{len(slices)} annotated slice(s) along axis {axis}: {listed}")

    def start(self):
        image, labels = self.image.value, self.labels.value
        if image is None or labels is None:
            show_info("Choose the scan and the Labels layer with your annotation.")
            return None
        try:
            volume = volume_from_layer(image)
            model = self.picker.current_model()
        except MedNCAError as exc:
            notify_error(exc)
            return None
        done = partial(self._show_result, image.name, self.picker.combo.currentText())
        # a snapshot of the annotation: painting on while it trains does not change this run
        self.worker = run_worker(
            self.progress, finetune_and_segment, model, volume, np.array(labels.data),
            iterations=int(self.iterations.value), lr=float(self.lr.value), seed=int(self.seed.value),
            on_yield=self._on_event, on_return=done, text="fine-tuning…",
        )
        if self.worker is not None:  # its events reach this (GUI) thread only after this method returns
            self.plot.reset()
            self.result_label.setText("")
            # Keep/Revert wait for the run; a cancelled or failed one leaves the previous result keepable
            self._set_result_buttons(False)
            self.worker.finished.connect(lambda: self._set_result_buttons(self.adapted is not None))
            self.worker.aborted.connect(
                lambda: self.result_label.setText("Cancelled: the chosen model is unchanged, nothing was added.")
            )
        return self.worker

    def _on_event(self, event):
        """Training events draw the loss curve and drive the bar; segmentation progress drives it alone."""
        if getattr(event, "loss", None) is None:
            return
        self.plot.add_loss(event.iteration, event.loss)
        self.progress.bar.setRange(0, event.total)
        self.progress.bar.setValue(event.iteration)
        self.progress.label.setText(f"fine-tuning {event.iteration}/{event.total}, {event.elapsed:.1f} s")

    def _show_result(self, image_name, base_name, result):
        model, report, segmentation = result
        name = f"{image_name}{TUNED_SUFFIX}"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.viewer.add_labels(segmentation.labels.array, name=name, **layer_kwargs(segmentation.labels))
        show_slices_along(self.viewer, segmentation.axis)
        self.plot.set_losses(report.losses)
        self.adapted = (model, report, name)
        self.result_label.setText(
            f"Dice on the {len(report.slices)} annotated slice(s): before {format_dice(report.dice_before)}, "
            f"after {format_dice(report.dice_after)}; {report.iterations} iterations in {report.seconds:.1f} s"
        )
        self.name_edit.setText(f"{base_name}-finetuned")
        self._set_result_buttons(True)

    def _set_result_buttons(self, enabled: bool) -> None:
        for w in (self.name_edit, self.keep_button, self.revert_button):
            w.setEnabled(enabled)

    def keep(self):
        """Save the adapted model under the chosen name; returns its path (None if nothing was saved)."""
        if self.adapted is None:
            return None
        try:
            path = save_user_model(self.adapted[0], self.name_edit.text().strip())
        except (MedNCAError, OSError) as exc:
            notify_error(exc)
            return None
        self.adapted = None
        self._set_result_buttons(False)
        refresh_model_lists(self)
        show_info(f"adapted model saved as {path.stem} ({path})")
        return path

    def revert(self):
        """Forget the adapted model and remove the segmentation it made."""
        if self.adapted is None:
            return
        name = self.adapted[2]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.adapted = None
        self.result_label.setText("Reverted: the adapted model was discarded.")
        self._set_result_buttons(False)
