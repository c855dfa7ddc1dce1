"""A live training curve: loss per iteration, and a Dice curve when there is one.

Points arrive from a worker thread's ``yielded`` signal, possibly dozens per second, and the GUI thread is
shared with the viewer: on a busy machine a drawing can take a tenth of a second. So a point is only stored
when it arrives; a timer updates the lines and asks for a redraw at most every ``REDRAW_MS``, the curve drawn
has at most ``MAX_DRAWN`` points, and the margins are fixed in pixels rather than measured at each draw.
"""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from .._colours import BACKGROUND, FOREGROUND

LOSS_COLOUR = "#5ab4ff"
DICE_COLOUR = "#ffb347"
REDRAW_MS = 500
MAX_DRAWN = 300  # points per line on screen; a long run is thinned evenly, its ends kept


MARGINS_PX = {"left": 42, "right": 38, "bottom": 38, "top": 6}  # room for tick labels and axis titles


def dark_axes(figure: Figure):
    """One axes in napari's dark theme colours."""
    figure.clear()
    figure.set_facecolor(BACKGROUND)
    ax = figure.add_subplot(111)
    ax.set_facecolor(BACKGROUND)
    for side in ax.spines.values():
        side.set_color(FOREGROUND)
    ax.tick_params(colors=FOREGROUND, labelsize=8)
    ax.grid(True, color=FOREGROUND, alpha=0.15)
    return ax


def thinned(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_DRAWN:
        return points
    step = len(points) / (MAX_DRAWN - 1)
    return [points[round(i * step)] for i in range(MAX_DRAWN - 1)] + [points[-1]]


class LossPlot(QWidget):
    """Loss (left axis) and Dice (right axis, 0..1) against the iteration."""

    def __init__(self, parent: QWidget | None = None, dice_label: str = "validation Dice", height: int = 130):
        super().__init__(parent)
        self.figure = Figure(figsize=(3, height / 100), dpi=100, facecolor=BACKGROUND)  # its size is the hint
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(height)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._dice_label = dice_label
        self._redraw = QTimer(self)
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(REDRAW_MS)
        self._redraw.timeout.connect(self._update)
        self.losses: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.draws = 0  # redraws asked for: what the responsiveness tests count
        self._build_axes()
        self.canvas.mpl_connect("resize_event", self._fit_margins)

    def _fit_margins(self, _event=None) -> None:
        """Margins fixed in pixels (a fraction of a short plot leaves no room for the labels), set when the
        size changes rather than measured at every draw."""
        width, height, m = self.figure.bbox.width, self.figure.bbox.height, MARGINS_PX
        if width <= 2 * (m["left"] + m["right"]) or height <= 2 * (m["bottom"] + m["top"]):
            return  # too small to hold them: matplotlib's own fractions
        self.figure.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width,
                                    bottom=m["bottom"] / height, top=1 - m["top"] / height)

    def _build_axes(self) -> None:
        ax = dark_axes(self.figure)
        self._fit_margins()
        ax.set_xlabel("iteration", color=FOREGROUND, fontsize=8)
        ax.set_ylabel("loss", color=LOSS_COLOUR, fontsize=8)
        (self._loss_line,) = ax.plot([], [], color=LOSS_COLOUR, linewidth=1.5)
        self._ax = ax
        self._dice_ax = None
        self._dice_line = None

    def reset(self) -> None:
        """Forget all points (a new run starts)."""
        self.losses.clear()
        self.dice.clear()
        self._build_axes()
        self._later()

    def add_loss(self, iteration: int, loss: float) -> None:
        self.losses.append((int(iteration), float(loss)))
        self._later()

    def set_losses(self, losses, start: int = 1) -> None:
        """A whole curve at once (one value per iteration, counted from ``start``), replacing the live one:
        the final report holds every iteration, the live events only some."""
        self.losses = [(start + i, float(v)) for i, v in enumerate(losses)]
        self._later()

    def add_dice(self, iteration: int, dice: float) -> None:
        self.dice.append((int(iteration), float(dice)))
        self._later()

    def _later(self) -> None:
        if not self._redraw.isActive():
            self._redraw.start()

    def _update(self) -> None:
        if self.losses:
            xs, ys = zip(*thinned(self.losses), strict=True)
            self._loss_line.set_data(xs, ys)
        if self.dice:
            if self._dice_ax is None:
                self._dice_ax = self._ax.twinx()
                self._dice_ax.set_ylim(0.0, 1.0)
                self._dice_ax.tick_params(colors=FOREGROUND, labelsize=8)
                self._dice_ax.set_ylabel(self._dice_label, color=DICE_COLOUR, fontsize=8)
                (self._dice_line,) = self._dice_ax.plot([], [], "o-", color=DICE_COLOUR, markersize=3, linewidth=1)
            xs, ys = zip(*thinned(self.dice), strict=True)
            self._dice_line.set_data(xs, ys)
        last = max([i for i, _ in self.losses + self.dice], default=1)
        self._ax.set_xlim(0, max(last, 1) * 1.02)
        self._ax.relim()
        self._ax.autoscale_view(scalex=False)
        self.draws += 1
        self.canvas.draw_idle()
