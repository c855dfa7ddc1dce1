"""A live training curve for the dock widgets: loss per iteration, and validation Dice when there is one.

Points arrive from a worker thread's ``yielded`` signal, possibly dozens per second. Drawing is what costs
(tens of milliseconds on the GUI thread, competing with the worker for Python's lock), so points are only
stored as they come and the canvas is redrawn at most a few times a second, with fixed margins rather than
a layout engine that would measure every label again at each draw.
"""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

# napari's default dark theme, so the plot sits in the dock without a white box
BACKGROUND = "#262930"
FOREGROUND = "#d1d2d4"
LOSS_COLOUR = "#5ab4ff"
DICE_COLOUR = "#ffb347"
REDRAW_MS = 300


class LossPlot(QWidget):
    """Loss (left axis) and Dice (right axis, 0..1) against the iteration."""

    def __init__(self, parent: QWidget | None = None, dice_label: str = "validation Dice"):
        super().__init__(parent)
        self.figure = Figure(figsize=(4, 2.4), facecolor=BACKGROUND)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._dice_label = dice_label
        self._redraw = QTimer(self)
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(REDRAW_MS)
        self._redraw.timeout.connect(self.canvas.draw_idle)
        self.losses: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self._build_axes()

    def _build_axes(self) -> None:
        self.figure.clear()
        self.figure.subplots_adjust(left=0.17, right=0.86, bottom=0.2, top=0.95)
        ax = self.figure.add_subplot(111)
        ax.set_facecolor(BACKGROUND)
        for side in ax.spines.values():
            side.set_color(FOREGROUND)
        ax.tick_params(colors=FOREGROUND, labelsize=8)
        ax.set_xlabel("iteration", color=FOREGROUND, fontsize=8)
        ax.set_ylabel("loss", color=LOSS_COLOUR, fontsize=8)
        ax.grid(True, color=FOREGROUND, alpha=0.15)
        (self._loss_line,) = ax.plot([], [], color=LOSS_COLOUR, linewidth=1.5)
        self._ax = ax
        self._dice_ax = None
        self._dice_line = None

    def reset(self) -> None:
        """Forget all points (a new run starts)."""
        self.losses.clear()
        self.dice.clear()
        self._build_axes()
        self._redraw.start()

    def add_loss(self, iteration: int, loss: float) -> None:
        self.losses.append((int(iteration), float(loss)))
        self._show_losses()

    def set_losses(self, losses, start: int = 1) -> None:
        """A whole curve at once (one value per iteration, counted from ``start``), replacing the live one:
        the final report holds every iteration, the live events only some."""
        self.losses = [(start + i, float(v)) for i, v in enumerate(losses)]
        self._show_losses()

    def _show_losses(self) -> None:
        if not self.losses:
            return
        xs, ys = zip(*self.losses, strict=True)
        self._loss_line.set_data(xs, ys)
        self._rescale()

    def add_dice(self, iteration: int, dice: float) -> None:
        if self._dice_ax is None:
            self._dice_ax = self._ax.twinx()
            self._dice_ax.set_ylim(0.0, 1.0)
            self._dice_ax.tick_params(colors=FOREGROUND, labelsize=8)
            self._dice_ax.set_ylabel(self._dice_label, color=DICE_COLOUR, fontsize=8)
            (self._dice_line,) = self._dice_ax.plot([], [], "o-", color=DICE_COLOUR, markersize=4, linewidth=1)
        self.dice.append((int(iteration), float(dice)))
        xs, ys = zip(*self.dice, strict=True)
        self._dice_line.set_data(xs, ys)
        self._rescale()

    def _rescale(self) -> None:
        last = max([i for i, _ in self.losses + self.dice], default=1)
        self._ax.set_xlim(0, max(last, 1) * 1.02)
        self._ax.relim()
        self._ax.autoscale_view(scalex=False)
        if not self._redraw.isActive():
            self._redraw.start()
