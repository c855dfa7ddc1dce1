"""Quality dock widget: where does the model disagree with itself?

One call of ``mednca.inference.quality_iter`` runs the stochastic automaton N times; the spread (std) of
its answers is shown over the scan, with the volume's NQM, a plot of NQM per slice and a list of the least
trustworthy slices. Clicking a slice in the list moves the viewer there, so a clinician can check it.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from magicgui.widgets import ComboBox, Container, SpinBox
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QListWidget, QListWidgetItem, QPushButton, QVBoxLayout, QWidget

from mednca.inference import quality_iter

from .._layers import layer_kwargs, scan_layers, show_slices_along, slice_world_position
from ._common import ModelPicker, ProgressPanel, run_worker, scan_and_model

TOP_SLICES = 5  # listed when no slice passes the threshold, so there is always somewhere to look


class QualityWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.picker = ModelPicker()
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.runs = SpinBox(label="runs", min=2, max=100, value=10)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.form = Container(widgets=[self.image, self.runs, self.seed])
        self.run_button = QPushButton("Compute quality map")
        self.progress = ProgressPanel()
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.figure = Figure(figsize=(3, 1.8), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        self.slices = QListWidget()
        self.slices.setToolTip("Least trustworthy slices: click one to look at it")
        self.report = None
        self._volume = None

        layout = QVBoxLayout(self)
        layout.addWidget(self.picker)
        layout.addWidget(self.form.native)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.summary)
        layout.addWidget(self.canvas)
        layout.addWidget(QLabel("slices to check"))
        layout.addWidget(self.slices)

        self.run_button.clicked.connect(self.compute)
        self.slices.itemClicked.connect(self.go_to_slice)
        self.reset_choices()

    def reset_choices(self, *_):
        self.form.reset_choices()

    def _image_layers(self, _widget=None):
        return scan_layers(self.viewer)

    def compute(self):
        layer = self.image.value
        chosen = scan_and_model(layer, self.picker)
        if chosen is None:
            return None
        volume, model = chosen
        done = partial(self._show_report, layer.name, volume)
        return run_worker(self.progress, quality_iter, model, volume, int(self.runs.value),
                          seed=int(self.seed.value), on_return=done, text="running the model repeatedly…")

    def _show_report(self, name, volume, report):
        self.report, self._volume = report, volume
        for k, cls in enumerate(report.class_names):
            std = report.std[k]
            kwargs = layer_kwargs(volume.like(std))
            kwargs["metadata"]["mednca_quality"] = {"runs": report.runs, "nqm": report.nqm}
            layer_name = f"{name} uncertainty: {cls}"
            if layer_name in self.viewer.layers:
                self.viewer.layers.remove(layer_name)
            self.viewer.add_image(std, name=layer_name, colormap="inferno", blending="additive",
                                  contrast_limits=(0.0, max(float(std.max()), 1e-6)), **kwargs)
        show_slices_along(self.viewer, report.axis)
        volumes = ", ".join(v.text() for v in report.volumes)
        self.summary.setText(
            f"{report.verdict.headline.upper()}: {report.verdict.text()}\n"
            f"NQM {report.nqm:.3f} over {report.runs} runs (lower is more trustworthy); "
            f"{len(report.flagged_slices)} slice(s) worth checking\nvolumes: {volumes}"
        )
        self._plot(report)
        self._list_slices(report)

    def _plot(self, report):
        self.figure.clear()
        ax = self.figure.add_subplot()
        ax.plot(report.slice_scores, color="tab:orange", lw=1.2)
        ax.axhline(report.criteria.slice_check, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(f"slice along axis {report.axis}", fontsize=8)
        ax.set_ylabel("uncertainty", fontsize=8)
        ax.tick_params(labelsize=7)
        self.canvas.draw_idle()

    def _list_slices(self, report):
        self.slices.clear()
        shown = report.flagged_slices or [int(i) for i in np.argsort(-report.slice_scores, kind="stable")[:TOP_SLICES]]
        for index in shown:
            flag = " (worth checking)" if index in report.flagged_slices else ""
            item = QListWidgetItem(f"slice {index}: uncertainty {report.slice_scores[index]:.2f}{flag}")
            item.setData(Qt.UserRole, index)
            self.slices.addItem(item)

    def go_to_slice(self, item: QListWidgetItem):
        """Show the slice of ``item`` along the model's axis."""
        if self.report is None:
            return
        index, axis = int(item.data(Qt.UserRole)), self.report.axis
        show_slices_along(self.viewer, axis)
        self.viewer.dims.set_point(self.viewer.dims.ndim - 3 + axis, slice_world_position(self._volume, axis, index))
