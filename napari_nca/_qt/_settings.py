"""The model's own settings (slice plane, steps, fire rate) and the seed, shared by every step of the panel.

A Med-NCA model is trained on one anatomical plane with one number of steps and one fire rate; away from
them its results degrade sharply (on a hippocampus MRI: the wrong plane took Dice from 0.87 to 0.26, fire
rate 0.9 to 0.03). So the settings start at the chosen model's values, live folded away under "Advanced",
and any difference from the model's values is named in a warning that stays visible, next to a way back.
"""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QPushButton, QSpinBox, QWidget

from mednca.model import MedNCA
from mednca.orientation import PLANE_NAMES, axis_codes, axis_of_plane, plane_of
from mednca.volume import Volume

MAX_SEED = 2**31 - 1


class ModelSettings(QWidget):
    """Slice plane, steps per level, fire rate and seed; ``changed`` fires on any edit."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.plane = QComboBox()
        self.plane.addItems(PLANE_NAMES)
        self.plane.setToolTip("The model reads the scan one 2D slice at a time, in this plane. It learned one "
                              "plane, chosen here when you pick the model; another plane usually gives much "
                              "worse results.")
        self.steps = QSpinBox()
        self.steps.setRange(1, 500)
        self.steps.setToolTip("How many rounds the model refines its outline at each of its resolutions. It "
                              "was trained with its own number: fewer leave the outline unfinished, more "
                              "rarely help.")
        self.fire_rate = QDoubleSpinBox()
        self.fire_rate.setRange(0.05, 1.0)
        self.fire_rate.setSingleStep(0.05)
        self.fire_rate.setToolTip("The share of pixels the model updates in each round (it is random on "
                                  "purpose). Keep the model's own value: far from it, results degrade sharply.")
        self.seed = QSpinBox()
        self.seed.setRange(0, MAX_SEED)
        self.seed.setToolTip("Fixes the model's randomness: the same seed gives the same result. Another seed "
                             "shows how much a result varies (Check quality does that for you).")
        self.reset_button = QPushButton("Reset to the model's settings")
        self.reset_button.setToolTip("Put plane, steps and fire rate back to the values the model was trained "
                                     "with")
        form = QFormLayout(self)
        form.setContentsMargins(12, 0, 0, 0)
        form.addRow("slice plane", self.plane)
        form.addRow("steps per level", self.steps)
        form.addRow("fire rate", self.fire_rate)
        form.addRow("seed", self.seed)
        form.addRow(self.reset_button)
        self._model_plane, self._model_steps, self._model_fire_rate = "axial", (16,), 0.5
        self.reset_button.clicked.connect(self.reset)
        self.plane.currentTextChanged.connect(self.changed)
        self.steps.valueChanged.connect(self.changed)
        self.fire_rate.valueChanged.connect(self.changed)
        self.seed.valueChanged.connect(self.changed)

    def use_model(self, model: MedNCA) -> None:
        """Take ``model``'s own plane, steps and fire rate as the values to start from and return to."""
        self._model_plane = plane_of(model.preprocessing.orientation, model.preprocessing.axis)
        self._model_steps = tuple(model.config.steps)
        self._model_fire_rate = float(model.config.fire_rate)
        self.reset()

    def reset(self) -> None:
        self.plane.setCurrentText(self._model_plane)
        self.steps.setValue(self._model_steps[0])
        self.fire_rate.setValue(self._model_fire_rate)

    @property
    def model_plane(self) -> str:
        return self._model_plane

    def differences(self) -> list[str]:
        """What differs from the model's own settings, in words (empty when nothing does)."""
        found = []
        if self.plane.currentText() != self._model_plane:
            found.append(f"slice plane {self.plane.currentText()} (the model learned {self._model_plane})")
        if self._steps_changed():
            found.append(f"{self.steps.value()} steps per level (the model's: {self._model_steps[0]})")
        if self._fire_rate_changed():
            found.append(f"fire rate {self.fire_rate.value():.2f} (the model's: {self._model_fire_rate:.2f})")
        return found

    def options(self, volume: Volume, levels: int) -> dict:
        """The engine's keyword arguments for ``volume``: the plane as the scan axis that lies in it, and
        steps and fire rate only where they differ from the model's (the model's own may differ per level)."""
        return {
            "axis": axis_of_plane(axis_codes(volume.affine), self.plane.currentText()),
            "seed": int(self.seed.value()),
            "steps": (int(self.steps.value()),) * levels if self._steps_changed() else None,
            "fire_rate": float(self.fire_rate.value()) if self._fire_rate_changed() else None,
        }

    def _steps_changed(self) -> bool:
        return self.steps.value() != self._model_steps[0]

    def _fire_rate_changed(self) -> bool:
        return abs(self.fire_rate.value() - self._model_fire_rate) > 1e-9
