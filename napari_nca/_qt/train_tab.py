"""Train (advanced) step: a new Med-NCA model from a Decathlon-style folder (dataset.json, imagesTr, labelsTr).

One engine call, ``mednca.training.train_iter``, runs in a worker, from a new model with the paper's
architecture or from the panel's model (which keeps its architecture and classes, and is itself never
changed). The loss curve and the validation Dice grow while it trains, Cancel stops it with nothing saved,
and the finished model goes to the user's model folder under the chosen name, where the model list finds it.

Where two or more cores are free when Train is pressed, the batches are shared among that many one-thread
processes (``train_iter(workers=...)``): a training step is hundreds of small operations, and two processes
train 1.5 to 1.8 times as fast as one thread where two threads of one process gain less (issue 16's
measurements, README *Speed*). The training itself is the same up to rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch._dynamo  # noqa: F401 (imported here, not by the worker's first optimiser: see finetune_tab)
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from mednca.errors import MedNCAError
from mednca.registry import save_user_model
from mednca.training import train_iter

from ._common import in_threads, notify_error, refresh_model_lists, run_worker
from ._loss_plot import LossPlot

POINTS = 200  # loss points reported over a run of any length...
LOG_EVERY_MAX = 20  # ...but at least one every 20 iterations, so a long run shows life at once
EVALUATIONS = 10  # validation Dice points over a run
DEFAULT_ITERATIONS = 2000
BATCH = 16  # train_iter's default batch size: the most processes that can share it


def train_worker(folder, *, threads, **kwargs):
    """Worker generator: ``train_iter`` with ``threads`` torch threads; returns the trained model."""
    return (yield from in_threads(train_iter(folder, **kwargs), threads))


def processes_for(free_cores: int) -> int:
    """Training processes for ``free_cores`` free cores: one per core, up to the batch size."""
    return max(1, min(free_cores, BATCH))


class TrainStep(QWidget):
    def __init__(self, panel):
        super().__init__()
        self.panel = panel
        intro = QLabel("Train a model on your own labelled scans (hours on a laptop). Most users only need "
                       "Fine-tune.")
        intro.setWordWrap(True)
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("folder with dataset.json, imagesTr/, labelsTr/")
        self.folder.setToolTip("A Medical Segmentation Decathlon style folder: dataset.json, the scans in "
                               "imagesTr/ and their label maps in labelsTr/")
        self.browse = QToolButton()
        self.browse.setText("…")
        self.browse.setToolTip("Choose the dataset folder")
        self.name = QLineEdit("my-model")
        self.name.setToolTip("The name the new model is saved under (letters, digits, - _ .)")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 1_000_000)
        self.iterations.setValue(DEFAULT_ITERATIONS)
        self.iterations.setToolTip("Training rounds: more take longer and usually learn better, up to a point "
                                   "(the validation Dice curve shows when it stops improving)")
        self.from_model = QCheckBox("start from the panel's model")
        self.from_model.setToolTip("Continue training the chosen model on your data: it keeps its structures "
                                   "and design, and the chosen model itself is not changed. Otherwise a new "
                                   "model of the paper's size starts from scratch.")
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("Train and save the new model (uses the seed of the advanced settings)")
        self.plot = LossPlot(height=90)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.save_button = QPushButton("Save again")
        self.save_button.setToolTip("Retry saving the trained model (e.g. after changing its name)")

        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder, 1)
        folder_row.addWidget(self.browse)
        form = QFormLayout()
        form.addRow("dataset", folder_row)
        form.addRow("model name", self.name)
        form.addRow("training rounds", self.iterations)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.from_model)
        layout.addWidget(self.train_button)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.result_label)
        layout.addWidget(self.save_button)

        self.trained = None  # a finished model whose save failed, kept for "Save again"
        self.worker = None
        self.processes = 1  # of the current or last run
        self.save_button.setVisible(False)
        self.browse.clicked.connect(self._choose_folder)
        self.train_button.clicked.connect(self.start)
        self.save_button.clicked.connect(self.save)

    def _choose_folder(self):
        chosen = QFileDialog.getExistingDirectory(self, "Decathlon-style dataset folder", self.folder.text())
        if chosen:
            self.folder.setText(chosen)

    def start(self):
        folder = Path(self.folder.text()).expanduser()
        if not self.folder.text() or not (folder / "dataset.json").is_file():
            show_info(f"Choose a Decathlon-style folder holding dataset.json, imagesTr/ and labelsTr/ ({folder}).")
            return None
        try:
            init = self.panel.picker.current_model() if self.from_model.isChecked() else None
        except MedNCAError as exc:
            notify_error(exc)
            return None
        total = int(self.iterations.value())
        free = self.panel.threads  # read once: the load average moves
        self.processes = processes_for(free)
        self.worker = run_worker(
            self.panel.progress, train_worker, folder, iterations=total, seed=int(self.panel.settings.seed.value()),
            init_model=init, log_every=min(max(1, total // POINTS), LOG_EVERY_MAX),
            eval_every=max(1, total // EVALUATIONS), batch_size=BATCH, workers=self.processes,
            threads=1 if self.processes > 1 else free,
            on_yield=self._on_event, on_return=self._finished, on_abort=self._cancelled, text="reading the dataset…",
        )
        if self.worker is not None:  # its events reach this (GUI) thread only after this method returns
            self.plot.reset()
            self.result_label.setText("")
            self.trained = None
            self.save_button.setVisible(False)
        return self.worker

    def _cancelled(self):
        self.result_label.setText("Cancelled: no model was saved.")

    def _on_event(self, event):
        if event.loss is not None:
            self.plot.add_loss(event.iteration, event.loss)
        if event.val_dice:
            self.plot.add_dice(event.iteration, event.val_dice["whole"])
        dice = f", validation Dice {self.plot.dice[-1][1]:.3f}" if self.plot.dice else ""
        on = f" on {self.processes} processes" if self.processes > 1 else ""
        self.panel.progress.show_count(event.iteration, event.total,
                                       f"training{on} {event.iteration}/{event.total}, {event.elapsed:.0f} s{dice}")

    def _finished(self, model):
        self.trained = model
        self.save()

    def save(self):
        """Save the trained model under the name in the form; returns its path, None if it failed."""
        if self.trained is None:
            return None
        try:
            path = save_user_model(self.trained, self.name.text().strip())
        except (MedNCAError, OSError) as exc:
            notify_error(exc)
            self.result_label.setText(f"Not saved: {exc}. Change the name and press 'Save again'.")
            self.save_button.setVisible(True)
            return None
        self.trained = None
        self.save_button.setVisible(False)
        refresh_model_lists(self)
        self.result_label.setText(f"Saved as {path.stem} ({path}); it is now in the model list.")
        show_info(f"trained model saved as {path.stem}")
        return path
