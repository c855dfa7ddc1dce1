"""The quality step's plot: how unsure the model is on each slice, against the limit above which a slice is
worth checking, in napari's dark theme. Clicking the plot goes to the slice under the cursor.

It is drawn once per quality check (not live), so matplotlib's constrained layout may measure the labels
to keep them inside whatever height the dock gives it."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from .._colours import BACKGROUND, FOREGROUND, VERDICT_COLOURS
from ._loss_plot import dark_axes

SCORE_COLOUR = "#5ab4ff"


class SliceScorePlot(QWidget):
    """Per-slice scores as a line, the limit dashed, the slices worth checking as dots, the slice being
    looked at as a vertical line."""

    slice_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None, height: int = 110):
        super().__init__(parent)
        self.figure = Figure(figsize=(3, height / 100), dpi=100, facecolor=BACKGROUND, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(height)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setToolTip("How unsure the model is on each slice (its runs' disagreement, relative to a "
                               "typical slice of the structure). Dots: slices above the dashed limit, worth "
                               "checking. Click to go to a slice.")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.ax = self._axes()
        self._marker = None
        self._n = 0
        self.canvas.mpl_connect("button_press_event", self._clicked)

    def show_scores(self, scores: np.ndarray, limit: float, flagged: list[int], plane: str) -> None:
        self.ax = self._axes()
        x = np.arange(len(scores))
        self.ax.plot(x, scores, color=SCORE_COLOUR, linewidth=1.2)
        self.ax.axhline(limit, color=VERDICT_COLOURS["check"], linestyle="--", linewidth=0.9)
        if flagged:
            self.ax.plot(flagged, np.asarray(scores)[flagged], "o", color=VERDICT_COLOURS["check"], markersize=3)
        self.ax.set_xlim(-0.5, max(len(scores) - 0.5, 0.5))
        self.ax.set_ylim(0, max(float(np.max(scores, initial=0.0)), limit) * 1.1)
        self.ax.set_xlabel(f"{plane} slice", color=FOREGROUND, fontsize=8, labelpad=1)
        self.ax.set_ylabel("unsure", color=FOREGROUND, fontsize=8, labelpad=1)
        self._marker = None
        self._n = len(scores)
        self.canvas.draw_idle()

    def _axes(self):
        ax = dark_axes(self.figure)
        self.figure.get_layout_engine().set(h_pad=0.02, w_pad=0.02)
        return ax

    def mark(self, index: int) -> None:
        """Show where the viewer is: a vertical line at slice ``index``."""
        if self._marker is None:
            self._marker = self.ax.axvline(index, color=FOREGROUND, linewidth=0.8, alpha=0.7)
        else:
            self._marker.set_xdata([index, index])
        self.canvas.draw_idle()

    def _clicked(self, event) -> None:
        if event.inaxes is self.ax and event.xdata is not None and self._n:
            self.slice_clicked.emit(int(np.clip(round(event.xdata), 0, self._n - 1)))
