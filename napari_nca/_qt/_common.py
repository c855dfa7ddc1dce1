"""Qt pieces the napari-nca panel's steps share: choosing a model and a layer, running engine generators in a
worker thread with a progress bar and a Cancel button, folding advanced settings away, and turning errors
into napari notifications.

The engine's long operations are generators yielding ``Progress`` and returning their result; a napari
``GeneratorWorker`` runs them off the GUI thread, and ``worker.quit()`` stops them at the next yield, so the
viewer never freezes and a run can be cancelled midway. A worker outlives nothing it reports to: closing
the panel stops it, and its late signals never reach a deleted widget.
"""

from __future__ import annotations

import os
from pathlib import Path

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from mednca.errors import MedNCAError
from mednca.inference import torch_threads
from mednca.model import MedNCA
from mednca.registry import list_models, load_model

FOLDER_ITEM = "Authors' checkpoint folder…"
FILE_ITEM = "File…"


def error_message(exc: BaseException) -> str:
    """Engine errors are written for users and shown as they are; anything else gets its type, so a bug
    report says what failed."""
    if isinstance(exc, MedNCAError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def notify_error(exc: BaseException) -> None:
    show_error(error_message(exc))


class _ModelCombo(QComboBox):
    """A combo box that asks to be re-listed each time it opens, so newly saved models appear."""

    about_to_open = Signal()

    def showPopup(self):  # noqa: N802 (Qt's name)
        self.about_to_open.emit()
        super().showPopup()


class ModelPicker(QWidget):
    """The shipped and user models (``mednca.registry.list_models``), plus entries to load the authors'
    checkpoint folder or a ``.safetensors`` file. ``current_model()`` loads the chosen one and keeps it
    cached until its file changes; ``model_changed`` carries the chosen path."""

    model_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = _ModelCombo()
        self.combo.setToolTip("The trained model every step uses: the shipped ones, those you saved after "
                              "fine-tuning or training, or a file or folder from disk. Point at an entry to "
                              "see what it was trained on and how well it did.")
        self.combo.setMinimumContentsLength(12)
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self._extra: list[Path] = []  # paths chosen from disk, kept listed
        self._cache: dict[tuple[str, int], MedNCA] = {}
        self._last = ""
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        self.combo.about_to_open.connect(self.refresh)
        self.combo.activated.connect(self._on_activated)
        self.combo.currentIndexChanged.connect(self._on_index_changed)
        self.refresh()

    def refresh(self) -> None:
        """Re-list the models, keeping the current choice when it is still there."""
        keep = self.current_path()
        self.combo.blockSignals(True)
        self.combo.clear()
        for entry in list_models():
            self.combo.addItem(entry.name, str(entry.path))
            self.combo.setItemData(self.combo.count() - 1, entry.summary, Qt.ToolTipRole)
        for path in self._extra:
            self.combo.addItem(path.name, str(path))
        self.combo.addItem(FOLDER_ITEM, None)
        self.combo.addItem(FILE_ITEM, None)
        index = self.combo.findData(keep) if keep else -1
        self.combo.setCurrentIndex(max(index, 0) if self.combo.itemData(0) else -1)
        self.combo.blockSignals(False)
        self._on_index_changed()

    def current_path(self) -> str | None:
        data = self.combo.currentData()
        return str(data) if data else None

    def set_path(self, path: str | os.PathLike) -> None:
        """Choose a model file or checkpoint folder (what the file dialogs do)."""
        path = Path(path).expanduser().resolve()
        index = self.combo.findData(str(path))
        if index < 0:
            self._extra.append(path)
            self.refresh()
            index = self.combo.findData(str(path))
        self.combo.setCurrentIndex(index)

    def current_model(self) -> MedNCA:
        """The chosen model, loaded once per file version. Raises ``MedNCAError`` if none is chosen or the
        file cannot be loaded."""
        path = self.current_path()
        if path is None:
            raise MedNCAError("no model chosen: pick one in the model list, or load a file or checkpoint folder")
        key = (path, _mtime(Path(path)))
        if key not in self._cache:
            self._cache = {key: load_model(path)}  # one model kept: the others are cheap to load again
        return self._cache[key]

    def _on_activated(self, index: int) -> None:
        text = self.combo.itemText(index)
        if text == FOLDER_ITEM:
            chosen = QFileDialog.getExistingDirectory(self, "Folder with the authors' model0.pth, model1.pth")
        elif text == FILE_ITEM:
            chosen, _ = QFileDialog.getOpenFileName(self, "Med-NCA model", "", "Med-NCA model (*.safetensors)")
        else:
            return
        if chosen:
            self.set_path(chosen)
        else:  # dialog cancelled: back to the previous model, or to no choice
            previous = self.combo.findData(self._last) if self._last else -1
            self.combo.setCurrentIndex(previous if previous >= 0 else (0 if self.combo.itemData(0) else -1))

    def _on_index_changed(self, *_) -> None:
        path = self.current_path() or ""
        if path and path != self._last:
            self._last = path
            self.model_changed.emit(path)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


class ProgressPanel(QWidget):
    """A progress bar saying what runs (its text is on the bar, so it costs one row), and a Cancel button
    stopping the running worker."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setFormat("")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running step; nothing it would have added is added, and the "
                                      "model stays as it was")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.worker = None
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)

    @property
    def busy(self) -> bool:
        return self.worker is not None

    @property
    def text(self) -> str:
        return self.bar.format()

    def set_text(self, text: str) -> None:
        self.bar.setFormat(text.replace("%", "%%"))
        self.bar.setToolTip(text)

    def started(self, worker, text: str = "running…") -> None:
        self.worker = worker
        self.bar.setRange(0, 0)  # busy until the first progress arrives
        self.set_text(text)
        self.cancel_button.setEnabled(True)

    def show_progress(self, value) -> None:
        """Accepts anything with ``done``, ``total`` and ``stage`` (the engine's ``Progress``)."""
        done, total = getattr(value, "done", None), getattr(value, "total", None)
        if done is None or not total:
            return
        self.show_count(int(done), int(total), f"{getattr(value, 'stage', '')} {done}/{total}".strip())

    def show_count(self, done: int, total: int, text: str) -> None:
        self.bar.setRange(0, total)
        self.bar.setValue(done)
        self.set_text(text)

    def cancel(self) -> None:
        if self.worker is not None:
            self.set_text("cancelling…")
            self.worker.quit()

    def finished(self, text: str) -> None:
        self.worker = None
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if text == "done" else 0)
        self.set_text(text)
        self.cancel_button.setEnabled(False)


def alive(widget: QWidget) -> bool:
    """False once Qt has deleted ``widget`` (its panel was closed): touching it then raises RuntimeError."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


def run_worker(panel: ProgressPanel, function, *args, on_yield=None, on_return=None, on_error=None,
               on_abort=None, on_finish=None, text: str = "running…", **kwargs):
    """Run ``function(*args, **kwargs)`` (a generator function, typically an engine ``*_iter``) in a napari
    worker thread wired to ``panel``; returns the started worker.

    Yielded values update the panel and go to ``on_yield``; the generator's return value goes to
    ``on_return`` (on the GUI thread); an exception becomes one notification (engine errors with their own
    words) and goes to ``on_error``. Cancel stops the generator at its next yield, closes it (its ``finally``
    blocks run) and calls ``on_abort`` instead; ``on_finish`` comes last in every case.
    A panel that is already running refuses a second run. When ``panel`` is deleted (the dock was closed)
    the worker is told to stop, and none of its later signals reaches a widget.
    """
    if panel.busy:
        show_info("A run is already in progress: wait for it or cancel it first.")
        return None
    work = function(*args, **kwargs)

    def relay():  # the worker's generator; ``work`` stays ours to close on Cancel
        return (yield from work)

    worker = create_worker(relay, _start_thread=False, _ignore_errors=True)
    try:  # napari would report the error a second time, with a traceback meant for developers
        worker.errored.disconnect(worker._relay_error)
    except (AttributeError, TypeError, RuntimeError):
        pass
    outcome = {"text": "done"}

    def guarded(callback):
        def call(*values):
            if alive(panel):
                callback(*values)
        return call

    def errored(exc):
        outcome["text"] = f"failed: {error_message(exc)}"
        notify_error(exc)
        if on_error is not None and alive(panel):
            on_error(exc)

    def aborted():
        # The worker thread has stopped at a yield and will not resume the generator, but napari keeps it
        # as it is; closing it runs its clean-up now (e.g. training ends its other processes), not at some
        # later garbage collection.
        work.close()
        outcome["text"] = "cancelled"
        if on_abort is not None and alive(panel):
            on_abort()

    if hasattr(worker, "yielded"):
        worker.yielded.connect(guarded(panel.show_progress))
        if on_yield is not None:
            worker.yielded.connect(guarded(on_yield))
    if on_return is not None:

        def returned(value):
            try:
                on_return(value)
            except Exception as exc:  # a result that cannot be shown must not take the viewer down
                errored(exc)

        worker.returned.connect(guarded(returned))
    worker.errored.connect(errored)
    if hasattr(worker, "aborted"):
        worker.aborted.connect(aborted)
    stop = worker.quit
    panel.destroyed.connect(stop)

    def finished():
        panel.destroyed.disconnect(stop)
        panel.finished(outcome["text"])
        if on_finish is not None:
            on_finish()

    worker.finished.connect(guarded(finished))
    panel.started(worker, text)
    worker.start()
    return worker


def in_threads(generator, threads: int):
    """``generator`` run with ``threads`` torch threads while it computes (engine calls without a ``threads``
    option), and the caller's setting while it is paused."""
    while True:
        with torch_threads(threads):
            try:
                item = next(generator)
            except StopIteration as stop:
                return stop.value
        yield item


class Collapsible(QWidget):
    """A header button that folds a group of settings away (folded at first): what a clinician rarely needs
    stays out of sight until asked for."""

    def __init__(self, title: str, content: QWidget, tooltip: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.toggle = QToolButton()
        self.toggle.setText(title)
        self.toggle.setToolTip(tooltip)
        self.toggle.setCheckable(True)
        self.toggle.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.toggle.setArrowType(Qt.RightArrow)
        self.toggle.setAutoRaise(True)
        self.content = content
        self.content.setVisible(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.toggle)
        layout.addWidget(self.content)
        self.toggle.toggled.connect(self.set_expanded)

    @property
    def expanded(self) -> bool:
        return self.toggle.isChecked()

    def set_expanded(self, expanded: bool) -> None:
        self.toggle.setChecked(expanded)
        self.toggle.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.content.setVisible(expanded)


class LayerCombo(QComboBox):
    """A choice among the layers ``list_layers()`` returns, as (name, layer) pairs; the chosen layer stays
    chosen across re-listing (layers added, removed, renamed) while it is still offered."""

    def __init__(self, list_layers, tooltip: str, parent: QWidget | None = None):
        super().__init__(parent)
        self._list_layers = list_layers
        self._layers: list = []
        self.setToolTip(tooltip)
        self.setMinimumContentsLength(12)
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.refresh()

    @property
    def value(self):
        index = self.currentIndex()
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def set_value(self, layer) -> None:
        self.refresh()
        for i, known in enumerate(self._layers):
            if known is layer:
                self.setCurrentIndex(i)
                return
        raise ValueError(f"{getattr(layer, 'name', layer)!r} is not one of the choices")

    def refresh(self) -> None:
        keep = self.value
        pairs = self._list_layers()
        self.blockSignals(True)
        self.clear()
        self._layers = [layer for _, layer in pairs]
        for name, _ in pairs:
            self.addItem(name)
        index = next((i for i, layer in enumerate(self._layers) if layer is keep), None)
        if index is None:
            index = len(self._layers) - 1  # the newest layer: the one just opened or made
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.value is not keep:
            self.currentIndexChanged.emit(self.currentIndex())


def refresh_model_lists(widget: QWidget) -> None:
    """Re-list the models in every model picker of the window ``widget`` is docked in (a saved model must
    show up in every list at once)."""
    root = widget.window()
    for picker in {*root.findChildren(ModelPicker), *widget.findChildren(ModelPicker)}:
        picker.refresh()
