"""Correct & fine-tune step: adapt the model to one scan from the slices a user corrected.

The user paints corrections on a segmentation layer (or on a new, empty Labels layer) in the model's plane.
On a segmentation the plugin made, the slices used are those the user changed (the layer keeps the labels
as the engine gave them); on any other layer, every labelled slice. The run is
``mednca.finetuning.finetune_iter`` on those slices, then ``segment_iter`` with the adapted model, in one
worker: the loss curve grows while it trains, and the new segmentation lands in a new layer beside the
user's, which is never written over. The readout is the engine's: whether the adapted model is expected
to be better on the slices nobody painted (cross-validated on the painted ones), and its advice; the
suggested button follows it (Revert when the adapted model is not expected to be better).

The engine hands back a new model only at the end, so Cancel leaves the chosen model as it was. "Keep"
saves the adapted model to the user's model folder and makes it the panel's model; "Revert" drops it and
its layer. "Save…" writes the corrected layer in the scan's geometry.
"""

from __future__ import annotations

import html
from functools import partial
from pathlib import Path

import numpy as np

# torch.optim imports torch._dynamo (about 800 modules) when the first optimiser is made; done in the worker
# thread, that import holds Python's lock long enough to freeze the viewer for up to a second, so it happens
# here, when the panel is loaded, instead.
import torch._dynamo  # noqa: F401
from napari.layers import Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from mednca.errors import MedNCAError
from mednca.finetuning import FINETUNE, annotated_slices, finetune_iter
from mednca.inference import segment_iter, slice_axis
from mednca.orientation import plane_of
from mednca.registry import save_user_model

from .._colours import VERDICT_COLOURS, labels_colormap
from .._layers import (
    ORIGINAL_KEY,
    RESULT_KEY,
    add_result,
    edited_slices,
    labels_layers_on,
    layer_kwargs,
    show_slices_along,
    versioned_name,
    volume_from_layer,
)
from .._writer import write_labels
from ._common import Collapsible, LayerCombo, alive, in_threads, notify_error, refresh_model_lists, run_worker
from ._loss_plot import LossPlot

RECOUNT_MS = 300  # painting fires many events; the list of corrected slices is recounted after a pause


def finetune_and_segment(model, volume, labels, *, slices, iterations, lr, seed, steps, fire_rate, threads,
                         base_name):
    """Worker generator: fine-tune, then segment the scan with the adapted model; returns
    ``(adapted model, FinetuneReport, Segmentation)``."""
    tuned, report = yield from in_threads(
        finetune_iter(model, volume, labels, slices, iterations=iterations, lr=lr, seed=seed, base_name=base_name),
        threads)
    segmentation = yield from segment_iter(tuned, volume, seed=seed, steps=steps, fire_rate=fire_rate,
                                           threads=threads)
    return tuned, report, segmentation


def advice_html(report) -> str:
    """The engine's recommendation first (in the verdict colours), then what the Dice on the painted slices
    does and does not say."""
    colour = VERDICT_COLOURS["ok" if report.recommended else "check"]
    advice = report.advice[:1].upper() + report.advice[1:]
    return (f"<b style='color:{colour}'>{html.escape(advice)}.</b><br><small>On the "
            f"{len(report.slices)} painted slice(s) it trained on, Dice went from {report.dice_before['whole']:.3f} "
            f"to {report.dice_after['whole']:.3f}: it learned them, which says nothing about the others.</small>")


class FinetuneStep(QWidget):
    def __init__(self, panel):
        super().__init__()
        self.panel = panel
        self.viewer = panel.viewer
        self.intro = QLabel("")
        self.intro.setWordWrap(True)
        self.labels = LayerCombo(self._labels_choices,
                                 "The Labels layer with your corrections: a segmentation you painted on, or a "
                                 "layer you painted from scratch")
        self.paint_button = QPushButton("Paint")
        self.paint_button.setToolTip("Select this layer for painting and show the model's plane")
        self.new_button = QPushButton("New layer")
        self.new_button.setToolTip("Add an empty Labels layer on the scan to paint the structures from scratch")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the corrected layer as a label file with the scan's exact geometry")
        self.slices_label = QLabel("")
        self.slices_label.setWordWrap(True)
        self.start_button = QPushButton("Fine-tune")
        self.start_button.setToolTip("Adapt the model to this scan from your corrected slices, then segment "
                                     "the scan again with it (a new layer, beside yours)")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setToolTip("Training rounds on your slices. More fit your slices more closely, and can "
                                   "make the slices you did not paint worse.")
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setToolTip("How big each training step is: larger learns faster but can overshoot. Keep the "
                           "default unless you know why.")
        self.defaults_button = QPushButton("Reset to the defaults")
        self.defaults_button.setToolTip("Put training rounds and learning rate back to the engine's defaults")
        settings = QWidget()
        form = QFormLayout(settings)
        form.setContentsMargins(12, 0, 0, 0)
        form.addRow("training rounds", self.iterations)
        form.addRow("learning rate", self.lr)
        form.addRow(self.defaults_button)
        self.advanced = Collapsible("Advanced", settings, "Training rounds and learning rate of the fine-tuning")
        self.plot = LossPlot(dice_label="", height=90)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextFormat(Qt.RichText)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name of the adapted model")
        self.name_edit.setToolTip("The name the adapted model is saved under (letters, digits, - _ .)")
        self.keep_button = QPushButton("Keep")
        self.keep_button.setToolTip("Save the adapted model to your model folder and use it from now on")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Discard the adapted model and the segmentation it made")

        layer_buttons = QHBoxLayout()
        layer_buttons.addWidget(self.paint_button)
        layer_buttons.addWidget(self.new_button)
        layer_buttons.addWidget(self.save_button)
        keep_row = QHBoxLayout()
        keep_row.addWidget(self.name_edit, 1)
        keep_row.addWidget(self.keep_button)
        keep_row.addWidget(self.revert_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.intro)
        layout.addWidget(self.labels)
        layout.addLayout(layer_buttons)
        layout.addWidget(self.slices_label)
        layout.addWidget(self.start_button)
        layout.addWidget(self.advanced)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.result_label)
        layout.addLayout(keep_row)

        self.adapted = None  # (model, report, layer) of the last run, until kept or reverted
        self.worker = None
        self._watched = None
        self._recount = QTimer(self)
        self._recount.setSingleShot(True)
        self._recount.setInterval(RECOUNT_MS)
        self._recount.timeout.connect(self.show_annotated_slices)
        self._set_result_buttons(False)
        self.reset_defaults()
        self.start_button.clicked.connect(self.start)
        self.keep_button.clicked.connect(self.keep)
        self.revert_button.clicked.connect(self.revert)
        self.paint_button.clicked.connect(self.paint)
        self.new_button.clicked.connect(self.new_layer)
        self.save_button.clicked.connect(self._ask_save)
        self.defaults_button.clicked.connect(self.reset_defaults)
        self.labels.currentIndexChanged.connect(self._watch_labels)

    def reset_defaults(self):
        self.iterations.setValue(FINETUNE.iterations)
        self.lr.setValue(FINETUNE.lr)

    # ------------------------------------------------------------------------------------- the corrections

    def _labels_choices(self):
        """Labels layers on the scan's grid, the plugin's segmentations and new layers last, so the newest
        of them is chosen at first rather than a reference opened from a file."""
        scan = self.panel.scan.value
        if scan is None:
            return []
        pairs = labels_layers_on(self.viewer, scan.data.shape)
        return sorted(pairs, key=lambda pair: RESULT_KEY in pair[1].metadata)

    def refresh_layers(self):
        self.labels.refresh()
        self._watch_labels()

    def _watch_labels(self, *_):
        """Follow painting on the chosen layer, so the list of corrected slices stays current."""
        layer = self.labels.value
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.paint.disconnect(self._painted)
                self._watched.events.data.disconnect(self._painted)
            self._watched = layer
            if layer is not None:
                layer.events.paint.connect(self._painted)
                layer.events.data.connect(self._painted)
        self.show_annotated_slices()

    def _painted(self, *_):
        if alive(self):
            self._recount.start()

    def training_slices(self) -> tuple[int, list[int], bool] | None:
        """(scan axis the model slices, the slices fine-tuning uses, whether they are the corrected slices of
        a segmentation) for the current choices; None when a choice is missing."""
        layer, scan = self.labels.value, self.panel.scan.value
        if layer is None or scan is None or self.panel.picker.current_path() is None:
            return None
        axis = slice_axis(self.panel.picker.current_model(), volume_from_layer(scan))
        edited = edited_slices(layer, axis)
        if edited is not None:
            return axis, edited, True
        return axis, annotated_slices(np.asarray(layer.data), axis), False

    def _plane(self) -> str:
        model = self.panel.picker.current_model()
        return plane_of(model.preprocessing.orientation, model.preprocessing.axis)

    def show_annotated_slices(self, *_):
        try:
            found = self.training_slices()
            plane = self._plane() if self.panel.picker.current_path() else "model's"
        except MedNCAError as exc:
            self.slices_label.setText(str(exc))
            return
        self.intro.setText(f"Correct the segmentation: paint on it in the {plane} view (or on a new layer). "
                           "Fine-tuning learns from the slices you changed.")
        if found is None:
            self.slices_label.setText("Segment the scan, or add a new layer, and paint on a few slices.")
            return
        _, slices, corrected = found
        what = "corrected" if corrected else "labelled"
        if not slices:
            self.slices_label.setText(f"No {what} {plane} slice yet: paint on a few slices.")
        else:
            listed = ", ".join(map(str, slices[:12])) + (" …" if len(slices) > 12 else "")
            self.slices_label.setText(f"{len(slices)} {what} {plane} slice(s): {listed}")

    def paint(self):
        """Select the corrections layer in paint mode, showing slices in the model's plane."""
        layer, scan = self.labels.value, self.panel.scan.value
        if layer is None or scan is None:
            show_info("Segment the scan first, or add a new layer to paint on.")
            return
        try:
            axis = slice_axis(self.panel.picker.current_model(), volume_from_layer(scan))
        except MedNCAError as exc:
            notify_error(exc)
            return
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        show_slices_along(self.viewer, axis)

    def new_layer(self):
        """An empty Labels layer on the scan's grid, named ``<scan>_labels``, ready to paint."""
        chosen = self.panel.scan_volume_model()
        if chosen is None:
            return None
        scan, volume, model = chosen
        empty = volume.like(np.zeros(volume.shape, np.uint8))
        kwargs = layer_kwargs(empty)
        kwargs["metadata"][RESULT_KEY] = {"kind": "annotation", "scan": scan.name}
        layer = Labels(empty.array, name=versioned_name(self.viewer, f"{scan.name}_labels"),
                       colormap=labels_colormap(model.config.output_channels), **kwargs)
        add_result(self.viewer, scan, layer)
        self.labels.set_value(layer)
        self.paint()
        return layer

    def _ask_save(self):
        layer = self.labels.value
        if layer is None:
            show_info("Choose the layer to save.")
            return
        source = getattr(layer.metadata.get("mednca_volume"), "source", None)
        folder = Path(source).parent if source else Path.home()
        path, _ = QFileDialog.getSaveFileName(self, "Save the corrected labels", str(folder / f"{layer.name}.nii.gz"),
                                              "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd);;MetaImage (*.mha)")
        if path:
            self.save(path)

    def save(self, path) -> bool:
        """Write the chosen corrections layer to ``path`` in the scan's geometry, with the plugin's own writer
        (napari's save would turn the engine's refusal to overwrite the scan into a console warning)."""
        layer = self.labels.value
        meta = {"metadata": layer.metadata, "scale": layer.scale, "translate": layer.translate, "name": layer.name}
        try:
            write_labels(path, layer.data, meta)
        except MedNCAError as exc:  # e.g. refusing to write over the scan
            notify_error(exc)
            return False
        show_info(f"saved {path}")
        return True

    # ------------------------------------------------------------------------------------------- the run

    def start(self):
        scan, labels = self.panel.scan.value, self.labels.value
        if scan is None or labels is None:
            show_info("Choose the scan and the Labels layer with your corrections.")
            return None
        chosen = self.panel.scan_volume_model()
        if chosen is None:
            return None
        _, volume, model = chosen
        try:
            _, slices, corrected = self.training_slices()
        except MedNCAError as exc:
            notify_error(exc)
            return None
        if corrected and not slices:
            show_info("No corrected slice yet: paint corrections on a few slices first.")
            return None
        options = self.panel.options(volume, model)
        done = partial(self._show_result, scan, self.panel.picker.combo.currentText(), options)
        # a snapshot of the corrections: painting on while it trains does not change this run
        self.worker = run_worker(
            self.panel.progress, finetune_and_segment, model, volume, np.array(labels.data),
            slices=slices if corrected else None, iterations=int(self.iterations.value()),
            lr=float(self.lr.value()), seed=options["seed"], steps=options["steps"],
            fire_rate=options["fire_rate"], threads=self.panel.threads, base_name=self.panel.picker.combo.currentText(),
            on_yield=self._on_event, on_return=done, on_abort=self._cancelled, on_finish=self._after_run,
            text="fine-tuning…",
        )
        if self.worker is not None:  # its events reach this (GUI) thread only after this method returns
            self.plot.reset()
            self.result_label.setText("")
            # Keep/Revert wait for the run; a cancelled or failed one leaves the previous result keepable
            self._set_result_buttons(False)
        return self.worker

    def _after_run(self):
        self._set_result_buttons(self.adapted is not None)

    def _cancelled(self):
        self.result_label.setText("Cancelled: the chosen model is unchanged, nothing was added.")

    def _on_event(self, event):
        """Training events feed the loss curve and the bar, the cross-validation's the bar alone;
        segmentation progress drives the bar by itself."""
        kind = getattr(event, "kind", None)
        if kind == "step":
            self.plot.add_loss(event.iteration, event.loss)
            self.panel.progress.show_count(event.iteration, event.total,
                                           f"fine-tuning {event.iteration}/{event.total}, {event.elapsed:.1f} s")
        elif kind == "fold":
            self.panel.progress.show_count(event.iteration, event.total,
                                           f"checking it on slices it did not train on {event.iteration}/{event.total}")

    def _show_result(self, scan, base_name, options, result):
        model, report, segmentation = result
        classes = ("background", *segmentation.class_names)
        kwargs = layer_kwargs(segmentation.labels)
        kwargs["metadata"].update({
            "class_names": classes,
            RESULT_KEY: {"kind": "segmentation", "scan": scan.name, "model": None,
                         "settings": {**options, "axis": segmentation.axis}, "source": "fine-tuned, not saved"},
            ORIGINAL_KEY: segmentation.labels.array.copy(),
        })
        layer = Labels(segmentation.labels.array, name=versioned_name(self.viewer, f"{scan.name}_seg_tuned"),
                       colormap=labels_colormap(len(segmentation.class_names)), **kwargs)
        add_result(self.viewer, scan, layer)
        self.plot.set_losses(report.losses)
        self.adapted = (model, report, layer)
        self.result_label.setText(advice_html(report))
        self.name_edit.setText(f"{base_name}-finetuned")
        self._set_result_buttons(True)
        self._highlight(self.keep_button if report.recommended else self.revert_button)

    def _highlight(self, button) -> None:
        """Make ``button`` the suggested choice (and the other one plain)."""
        for other in (self.keep_button, self.revert_button):
            chosen = other is button
            other.setDefault(chosen)
            other.setStyleSheet(f"font-weight: bold; border: 2px solid {VERDICT_COLOURS['ok']};" if chosen else "")

    def _set_result_buttons(self, enabled: bool) -> None:
        for w in (self.name_edit, self.keep_button, self.revert_button):
            w.setEnabled(enabled)

    def keep(self):
        """Save the adapted model under the chosen name and make it the panel's model; returns its path
        (None if nothing was saved)."""
        if self.adapted is None:
            return None
        model, _, layer = self.adapted
        try:
            path = save_user_model(model, self.name_edit.text().strip())
        except (MedNCAError, OSError) as exc:
            notify_error(exc)
            return None
        self.adapted = None
        self._set_result_buttons(False)
        refresh_model_lists(self)
        self.panel.picker.set_path(path)
        info = layer.metadata.get(RESULT_KEY)
        if info is not None:  # its quality can now be checked with the saved model
            info.update({"model": self.panel.picker.current_path(), "source": f"fine-tuned, saved as {path.stem}"})
        show_info(f"adapted model saved as {path.stem} ({path})")
        return path

    def revert(self):
        """Forget the adapted model and remove the segmentation it made."""
        if self.adapted is None:
            return
        layer = self.adapted[2]
        if layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        self.adapted = None
        self.result_label.setText("Reverted: the adapted model was discarded.")
        self._set_result_buttons(False)
