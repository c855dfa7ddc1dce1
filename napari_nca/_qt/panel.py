"""The napari-nca panel: one scan, one model, and the clinician's loop as four steps.

Segment, Check quality, Correct & fine-tune and Train (advanced) are tabs of one dock widget sharing the
scan choice, the model choice, the model's settings and one progress bar, so a quality verdict is always
about the model and settings that made the segmentation on screen. The whole panel fits a 1366x768 screen
beside the canvas; what does not fit on a smaller one scrolls rather than being cut off.
"""

from __future__ import annotations

from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFormLayout, QFrame, QLabel, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from mednca.threads import default_threads
from mednca.volume import Volume

from .._colours import VERDICT_COLOURS
from .._layers import scan_layers, volume_from_layer
from ._common import Collapsible, LayerCombo, ModelPicker, ProgressPanel, notify_error
from ._settings import ModelSettings
from .finetune_tab import FinetuneStep
from .quality_tab import QualityStep
from .segment_tab import SegmentStep
from .train_tab import TrainStep

TABS = (
    ("Segment", "Segment the scan with the model"),
    ("Quality", "Check quality: how far to trust the segmentation, which slices to check, volumes in mL"),
    ("Fine-tune", "Correct & fine-tune: paint corrections, then adapt the model to this scan"),
    ("Train", "Train (advanced): a new model from a folder of labelled scans"),
)


class NCAPanel(QWidget):
    """The dock widget napari opens with ``napari -w napari-nca``."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.scan = LayerCombo(lambda: scan_layers(self.viewer),
                               "The scan every step works on (File > Open, or File > Open Sample > napari-nca)")
        self.picker = ModelPicker()
        self.settings = ModelSettings()
        self.advanced = Collapsible("Advanced model settings", self.settings,
                                    "Slice plane, steps, fire rate and seed: the model's own values are set "
                                    "for you; change them only to experiment")
        self.warning = QLabel("")
        self.warning.setWordWrap(True)
        self.warning.setTextFormat(Qt.RichText)
        self.warning.setStyleSheet(f"color: {VERDICT_COLOURS['check']};")
        self.warning.setVisible(False)
        self.progress = ProgressPanel()

        self.segment = SegmentStep(self)
        self.quality = QualityStep(self)
        self.finetune = FinetuneStep(self)
        self.train = TrainStep(self)
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(False)
        self.tabs.setDocumentMode(True)
        for step, (title, tip) in zip((self.segment, self.quality, self.finetune, self.train), TABS, strict=True):
            self.tabs.addTab(step, title)
            self.tabs.setTabToolTip(self.tabs.count() - 1, tip)

        content = QWidget()
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("scan", self.scan)
        form.addRow("model", self.picker)
        layout = QVBoxLayout(content)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(form)
        layout.addWidget(self.advanced)
        layout.addWidget(self.warning)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.progress)
        self.scroll = QScrollArea()
        self.scroll.setWidget(content)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        self.setMinimumWidth(self._narrowest())

        self.picker.model_changed.connect(self._use_model)
        self.settings.changed.connect(self._show_differences)
        self.warning.linkActivated.connect(lambda _: self.settings.reset())
        self.scan.currentIndexChanged.connect(lambda _: self.finetune.refresh_layers())
        self._use_model()

    def _narrowest(self) -> int:
        return self.scroll.widget().minimumSizeHint().width() + self.scroll.verticalScrollBar().sizeHint().width()

    def sizeHint(self):  # noqa: N802 (Qt's name): docked as narrow as it can be, leaving the canvas wide
        hint = super().sizeHint()
        hint.setWidth(self._narrowest())
        return hint

    # napari calls this when layers are added, removed, reordered or renamed
    def reset_choices(self, *_):
        self.scan.refresh()
        self.finetune.refresh_layers()

    @property
    def threads(self) -> int:
        """Torch threads for a run: the cores the machine has free now (never more than torch's default)."""
        return default_threads()

    def scan_volume_model(self):
        """(scan layer, its Volume, the chosen model); tells the user and returns None when one is missing
        or cannot be used."""
        layer = self.scan.value
        if layer is None:
            show_info("Open a scan first (File > Open, or File > Open Sample > napari-nca).")
            return None
        try:
            return layer, volume_from_layer(layer), self.picker.current_model()
        except Exception as exc:  # shown, with its type when it is not an input error
            notify_error(exc)
            return None

    def options(self, volume: Volume, model) -> dict:
        """The shared settings as the engine's keyword arguments for ``volume`` and ``model``."""
        return self.settings.options(volume, model.config.levels)

    def _use_model(self, *_):
        """A model brings its own plane, steps and fire rate: they become the settings."""
        if self.picker.current_path() is None:  # nothing listed yet: the user will load one
            return
        try:
            model = self.picker.current_model()
        except Exception as exc:  # shown, with its type when it is not an input error
            notify_error(exc)
            return
        self.settings.use_model(model)
        self.segment.show_legend(model.config.class_names)
        self.finetune.show_annotated_slices()
        self._show_differences()

    def _show_differences(self):
        found = self.settings.differences()
        self.warning.setVisible(bool(found))
        if found:
            self.warning.setText("&#9888; Not the model's own settings: " + "; ".join(found)
                                 + ". Results can be much worse. <a href='reset'>Reset</a>")
