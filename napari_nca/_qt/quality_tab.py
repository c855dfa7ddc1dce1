"""Check quality step: how far to trust the segmentation, all from one ``quality_iter`` call.

The engine runs the stochastic automaton several times and judges the agreement of the runs. This step
shows its verdict in colour (OK green, check amber, likely failed red) with the engine's reasons, the NQM
with one sentence saying what it measures, the volumes in mL with their spread across the runs, a plot of
how unsure each slice is and the slices the engine flags as worth checking (a click goes there). The
uncertainty (standard deviation of the runs) lies over the scan as one map per structure.

The verdict is about the model and settings that made a segmentation: it is written on the scan's latest
segmentation layer made with the same model and settings (a failed one gets "(likely failed)" in its
name); when there is none, the quality run's own labels become that layer.
"""

from __future__ import annotations

import html
from functools import partial

import pandas as pd
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from mednca.inference import quality_iter
from mednca.orientation import axis_codes, plane_of

from .._colours import VERDICT_COLOURS, labels_colormap
from .._layers import (
    ORIGINAL_KEY,
    RESULT_KEY,
    add_result,
    go_to_slice,
    layer_kwargs,
    results_of,
    versioned_name,
)
from ._common import Collapsible, run_worker
from ._slice_plot import SliceScorePlot

DEFAULT_RUNS = 10
FAILED_MARK = " (likely failed)"


def verdict_html(verdict) -> str:
    """The verdict's headline and reasons as rich text."""
    reasons = "".join(f"<br>&bull; {html.escape(reason)}" for reason in verdict.reasons)
    headline = verdict.headline[:1].upper() + verdict.headline[1:]
    return f"<b>{html.escape(headline)}</b>{reasons}"


def nqm_sentence(report) -> str:
    c = report.criteria
    return (f"NQM {report.nqm:.3f}: the share of the segmentation on which the {report.runs} runs disagree "
            f"(0: full agreement; check above {c.nqm_check:g}, likely failed above {c.nqm_fail:g}).")


def volumes_html(volumes) -> str:
    """Volumes in mL, one row per structure, with the standard deviation across the runs."""
    rows = "".join(
        f"<tr><td>{html.escape(v.name)}&nbsp;&nbsp;</td><td align='right'>{v.ml:.2f}</td>"
        f"<td>{f'&nbsp;&plusmn;&nbsp;{v.sd_ml:.2f}' if v.sd_ml is not None else ''} mL</td></tr>"
        for v in volumes
    )
    return f"<table cellspacing='0'>{rows}</table>"


def volumes_tooltip(volumes) -> str:
    spans = [f"{v.name}: {v.low_ml:.2f}-{v.high_ml:.2f} mL" for v in volumes if v.low_ml is not None]
    return ("Volumes of the segmentation shown, ± the standard deviation across the runs; 95% of the runs "
            "gave " + ", ".join(spans)) if spans else "Volumes of the segmentation shown"


class CompactList(QListWidget):
    """A list that asks for little height (it grows into whatever the dock has to spare)."""

    def sizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        hint.setHeight(self.minimumHeight())
        return hint


class QualityStep(QWidget):
    def __init__(self, panel):
        super().__init__()
        self.panel = panel
        self.viewer = panel.viewer
        self.run_button = QPushButton("Check quality")
        self.run_button.setToolTip("Segment the scan several times: where the runs disagree, the segmentation "
                                   "is unsure. Gives a verdict, the volumes with their spread and the slices "
                                   "worth checking.")
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        self.verdict.setTextFormat(Qt.RichText)
        self.verdict.setVisible(False)
        self.nqm = QLabel("")
        self.nqm.setWordWrap(True)
        self.volumes = QLabel("")
        self.volumes.setTextFormat(Qt.RichText)
        self.plot = SliceScorePlot(height=80)
        self.slices_title = QLabel("Slices worth checking")
        self.slices = CompactList()
        self.slices.setToolTip("The slices where the model is least sure, worst first: click one to look at it")
        self.slices.setMinimumHeight(48)
        self.runs = QSpinBox()
        self.runs.setRange(2, 100)
        self.runs.setValue(DEFAULT_RUNS)
        self.runs.setToolTip("How many times the model segments the scan. More runs give a steadier verdict "
                             "and take proportionally longer.")
        runs_form = QWidget()
        form = QFormLayout(runs_form)
        form.setContentsMargins(12, 0, 0, 0)
        form.addRow("runs", self.runs)
        self.advanced = Collapsible("Advanced", runs_form, "How many runs the check makes")

        layout = QVBoxLayout(self)
        layout.addWidget(self.run_button)
        layout.addWidget(self.verdict)
        layout.addWidget(self.nqm)
        layout.addWidget(self.volumes)
        layout.addWidget(self.plot, 2)
        layout.addWidget(self.slices_title)
        layout.addWidget(self.slices, 1)
        layout.addWidget(self.advanced)

        self.report = None
        self.marked = None  # the segmentation layer the verdict was written on
        self._volume = None
        self.run_button.clicked.connect(self.compute)
        self.slices.itemClicked.connect(self.go_to_item)
        self.plot.slice_clicked.connect(self.go_to)

    def compute(self):
        chosen = self.panel.scan_volume_model()
        if chosen is None:
            return None
        scan, volume, model = chosen
        options = self.panel.options(volume, model)
        done = partial(self._show_report, scan, volume, self.panel.picker.current_path(), options)
        return run_worker(self.panel.progress, quality_iter, model, volume, int(self.runs.value()),
                          threads=self.panel.threads, on_return=done, text="running the model repeatedly…",
                          **options)

    def _show_report(self, scan, volume, model_path, options, report):
        self.report, self._volume = report, volume
        self.marked = self._mark_segmentation(scan, volume, model_path, options, report)
        for k, cls in enumerate(report.class_names):  # above the segmentation: where it is unsure glows
            self._show_uncertainty(scan, volume, report, k, cls)
        level = report.verdict.level
        self.verdict.setStyleSheet(f"background-color: {VERDICT_COLOURS[level]}; color: white; "
                                   "padding: 4px; border-radius: 3px;")
        self.verdict.setText(verdict_html(report.verdict))
        source = report.criteria.calibration.get("source")
        self.verdict.setToolTip(f"The engine's verdict; its limits: {source}" if source else "The engine's verdict")
        self.verdict.setVisible(True)
        self.nqm.setText(nqm_sentence(report))
        self.volumes.setText(volumes_html(report.volumes))
        self.volumes.setToolTip(volumes_tooltip(report.volumes))
        plane = plane_of(axis_codes(volume.affine), report.axis)
        self.plot.show_scores(report.slice_scores, report.criteria.slice_check, report.flagged_slices, plane)
        self._list_slices(report, plane)

    def _show_uncertainty(self, scan, volume, report, k, cls):
        """The runs' standard deviation of one class over the scan; replaces the scan's earlier map of it."""
        std = report.std[k]
        kwargs = layer_kwargs(volume.like(std))
        kwargs["metadata"][RESULT_KEY] = {"kind": "uncertainty", "scan": scan.name, "class": cls,
                                          "runs": report.runs, "nqm": report.nqm}
        earlier = [layer for layer in results_of(self.viewer, scan.name, "uncertainty")
                   if layer.metadata[RESULT_KEY]["class"] == cls]
        layer = Image(std, name=f"{scan.name}_std_{cls}", colormap="inferno", blending="additive",
                      contrast_limits=(0.0, max(float(std.max()), 1e-6)), **kwargs)
        add_result(self.viewer, scan, layer, replaces=earlier[-1] if earlier else None)

    def _mark_segmentation(self, scan, volume, model_path, options, report):
        """Write the verdict on the segmentation it is about (see the module docstring); returns that layer."""
        same = [layer for layer in results_of(self.viewer, scan.name, "segmentation")
                if layer.metadata[RESULT_KEY].get("model") == model_path
                and layer.metadata[RESULT_KEY].get("settings") == options]
        if same:
            layer = same[-1]
        else:
            classes = ("background", *report.class_names)
            kwargs = layer_kwargs(report.labels)
            kwargs["metadata"].update({
                "class_names": classes,
                RESULT_KEY: {"kind": "segmentation", "scan": scan.name, "model": model_path, "settings": options,
                             "source": f"mean of {report.runs} runs"},
                ORIGINAL_KEY: report.labels.array.copy(),
            })
            layer = Labels(report.labels.array, name=versioned_name(self.viewer, f"{scan.name}_seg"),
                           colormap=labels_colormap(len(report.class_names)),
                           features=pd.DataFrame({"index": range(len(classes)), "class": classes}), **kwargs)
            add_result(self.viewer, scan, layer)
        info = layer.metadata[RESULT_KEY]
        info["verdict"] = {"level": report.verdict.level, "reasons": list(report.verdict.reasons)}
        name = layer.name.removesuffix(FAILED_MARK)
        layer.name = name + FAILED_MARK if report.verdict.level == "fail" else name
        return layer

    def _list_slices(self, report, plane):
        self.slices.clear()
        for index in report.flagged_slices:
            item = QListWidgetItem(f"{plane} slice {index}: unsure {report.slice_scores[index]:.2f}")
            item.setData(Qt.UserRole, int(index))
            self.slices.addItem(item)
        flagged = len(report.flagged_slices)
        self.slices_title.setText(f"{flagged} slice(s) worth checking" if flagged else "No slice needs checking")
        self.slices.setVisible(bool(flagged))

    def go_to_item(self, item: QListWidgetItem):
        self.go_to(int(item.data(Qt.UserRole)))

    def go_to(self, index: int):
        """Show slice ``index`` along the axis the quality was measured on."""
        if self.report is None:
            return
        go_to_slice(self.viewer, self._volume, self.report.axis, index)
        self.plot.mark(index)
