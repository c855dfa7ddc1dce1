"""Qt pieces every napari-nca widget shares: choosing a model, running engine generators in a worker thread
with a progress bar and a Cancel button, and turning errors into napari notifications.

The engine's long operations are generators yielding ``Progress`` and returning their result; a napari
``GeneratorWorker`` runs them off the GUI thread, and ``worker.quit()`` stops them at the next yield, so the
viewer never freezes and a run can be cancelled midway.
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
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from mednca.errors import MedNCAError
from mednca.model import MedNCA
from mednca.registry import list_models, load_model
from mednca.volume import Volume

from .._layers import volume_from_layer

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
        self.combo.setToolTip("Med-NCA model: shipped, saved by Fine-tune/Train, or loaded from disk")
        self._extra: list[Path] = []  # paths chosen from disk, kept listed
        self._cache: dict[tuple[str, int], MedNCA] = {}
        self._last = ""
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("model"))
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
    """Progress bar, a line saying what runs, and a Cancel button stopping the running worker."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.worker = None
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.label)

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def started(self, worker, text: str = "running…") -> None:
        self.worker = worker
        self.bar.setRange(0, 0)  # busy until the first progress arrives
        self.label.setText(text)
        self.cancel_button.setEnabled(True)

    def show_progress(self, value) -> None:
        """Accepts anything with ``done``, ``total`` and ``stage`` (the engine's ``Progress``)."""
        done, total = getattr(value, "done", None), getattr(value, "total", None)
        if done is None or not total:
            return
        self.bar.setRange(0, int(total))
        self.bar.setValue(int(done))
        stage = getattr(value, "stage", "")
        self.label.setText(f"{stage} {done}/{total}".strip())

    def cancel(self) -> None:
        if self.worker is not None:
            self.label.setText("cancelling…")
            self.worker.quit()

    def finished(self, text: str) -> None:
        self.worker = None
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if text == "done" else 0)
        self.label.setText(text)
        self.cancel_button.setEnabled(False)


def run_worker(panel: ProgressPanel, function, *args, on_yield=None, on_return=None, on_error=None,
               text: str = "running…", **kwargs):
    """Run ``function(*args, **kwargs)`` (a generator function, typically an engine ``*_iter``) in a napari
    worker thread wired to ``panel``; returns the started worker.

    Yielded values update the panel and go to ``on_yield``; the generator's return value goes to
    ``on_return`` (on the GUI thread); an exception becomes one notification (engine errors with their own
    words) and goes to ``on_error``. Cancel stops the generator at its next yield and calls neither.
    A panel that is already running refuses a second run.
    """
    if panel.busy:
        show_info("A run is already in progress: wait for it or cancel it first.")
        return None
    worker = create_worker(function, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    try:  # napari would report the error a second time, with a traceback meant for developers
        worker.errored.disconnect(worker._relay_error)
    except (AttributeError, TypeError, RuntimeError):
        pass
    outcome = {"text": "done"}

    def errored(exc):
        outcome["text"] = f"failed: {error_message(exc)}"
        notify_error(exc)
        if on_error is not None:
            on_error(exc)

    def aborted():
        outcome["text"] = "cancelled"

    if hasattr(worker, "yielded"):
        worker.yielded.connect(panel.show_progress)
        if on_yield is not None:
            worker.yielded.connect(on_yield)
    if on_return is not None:

        def returned(value):
            try:
                on_return(value)
            except Exception as exc:  # a result that cannot be shown must not take the viewer down
                errored(exc)

        worker.returned.connect(returned)
    worker.errored.connect(errored)
    if hasattr(worker, "aborted"):
        worker.aborted.connect(aborted)
    worker.finished.connect(lambda: panel.finished(outcome["text"]))
    panel.started(worker, text)
    worker.start()
    return worker


def refresh_model_lists(widget: QWidget) -> None:
    """Re-list the models in every model picker of the window ``widget`` is docked in (a saved model must
    show up in the other widgets at once)."""
    root = widget.window()
    for picker in {*root.findChildren(ModelPicker), *widget.findChildren(ModelPicker)}:
        picker.refresh()


def scan_and_model(layer, picker: ModelPicker) -> tuple[Volume, MedNCA] | None:
    """The chosen scan as a Volume and the chosen model; tells the user and returns None when either is
    missing or cannot be used."""
    if layer is None:
        show_info("Open a scan first (File > Open, or File > Open Sample > napari-nca).")
        return None
    try:
        return volume_from_layer(layer), picker.current_model()
    except Exception as exc:  # shown, with its type when it is not an input error
        notify_error(exc)
        return None
