"""Train dock widget: a new Med-NCA model from a Decathlon-style folder (dataset.json, imagesTr, labelsTr).

One engine call, ``mednca.training.train_iter``, runs in a worker, from a new model with the paper's
architecture or from a chosen model (which keeps its architecture and classes, and is itself never changed).
The loss curve and the validation Dice grow while it trains, Cancel stops it with nothing saved, and the
finished model goes to the user's model folder under the chosen name, where every model list finds it.
"""

from __future__ import annotations

from pathlib import Path

import torch._dynamo  # noqa: F401 (imported here, not by the worker's first optimiser: see finetune_widget)
from magicgui.widgets import CheckBox, Container, FileEdit, LineEdit, SpinBox
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget

from mednca.errors import MedNCAError
from mednca.registry import save_user_model
from mednca.training import train_iter

from ._common import ModelPicker, ProgressPanel, notify_error, refresh_model_lists, run_worker
from ._loss_plot import LossPlot

POINTS = 200  # loss points reported over a run of any length...
LOG_EVERY_MAX = 20  # ...but at least one every 20 iterations, so a long run shows life at once
EVALUATIONS = 10  # validation Dice points over a run


class TrainWidget(QWidget):
    def __init__(self, napari_viewer=None):
        super().__init__()
        self.viewer = napari_viewer
        self.folder = FileEdit(label="dataset folder", mode="d",
                               tooltip="Decathlon-style task folder: dataset.json, imagesTr/, labelsTr/")
        self.iterations = SpinBox(label="iterations", min=1, max=1_000_000, value=2000)
        self.name = LineEdit(label="model name", value="my-model")
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.from_model = CheckBox(text="start from the model below (else a new paper-size model)", value=False,
                                   tooltip="Continue training a model on your data; it keeps its architecture "
                                           "and classes, and the chosen model itself is not changed")
        self.form = Container(widgets=[self.folder, self.iterations, self.name, self.seed, self.from_model])
        self.picker = ModelPicker()
        self.train_button = QPushButton("Train")
        self.progress = ProgressPanel()
        self.plot = LossPlot()
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.save_button = QPushButton("Save again")
        self.save_button.setToolTip("Retry saving the trained model (e.g. after changing its name)")

        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addWidget(self.picker)
        layout.addWidget(self.train_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.result_label)
        layout.addWidget(self.save_button)
        layout.addStretch(1)

        self.trained = None  # a finished model whose save failed, kept for "Save again"
        self.worker = None
        self.save_button.setVisible(False)
        self.train_button.clicked.connect(self.start)
        self.save_button.clicked.connect(self.save)

    def start(self):
        folder = Path(self.folder.value)
        if not (folder / "dataset.json").is_file():
            show_info(f"Choose a Decathlon-style folder holding dataset.json, imagesTr/ and labelsTr/ ({folder}).")
            return None
        try:
            init = self.picker.current_model() if self.from_model.value else None
        except MedNCAError as exc:
            notify_error(exc)
            return None
        total = int(self.iterations.value)
        self.worker = run_worker(
            self.progress, train_iter, folder, iterations=total, seed=int(self.seed.value), init_model=init,
            log_every=min(max(1, total // POINTS), LOG_EVERY_MAX), eval_every=max(1, total // EVALUATIONS),
            on_yield=self._on_event, on_return=self._finished, text="reading the dataset…",
        )
        if self.worker is not None:  # its events reach this (GUI) thread only after this method returns
            self.plot.reset()
            self.result_label.setText("")
            self.trained = None
            self.save_button.setVisible(False)
            self.worker.aborted.connect(lambda: self.result_label.setText("Cancelled: no model was saved."))
        return self.worker

    def _on_event(self, event):
        if event.loss is not None:
            self.plot.add_loss(event.iteration, event.loss)
        if event.val_dice:
            self.plot.add_dice(event.iteration, event.val_dice["whole"])
        self.progress.bar.setRange(0, event.total)
        self.progress.bar.setValue(event.iteration)
        dice = f", validation Dice {self.plot.dice[-1][1]:.3f}" if self.plot.dice else ""
        self.progress.label.setText(f"training {event.iteration}/{event.total}, {event.elapsed:.0f} s{dice}")

    def _finished(self, model):
        self.trained = model
        self.save()

    def save(self):
        """Save the trained model under the name in the form; returns its path, None if it failed."""
        if self.trained is None:
            return None
        try:
            path = save_user_model(self.trained, self.name.value.strip())
        except (MedNCAError, OSError) as exc:
            notify_error(exc)
            self.result_label.setText(f"Not saved: {exc}. Change the name and press 'Save again'.")
            self.save_button.setVisible(True)
            return None
        self.trained = None
        self.save_button.setVisible(False)
        refresh_model_lists(self)
        self.result_label.setText(f"Saved as {path.stem} ({path}); it is now in the model lists.")
        show_info(f"trained model saved as {path.stem}")
        return path
