"""Correct & fine-tune, driven as a user would: correct two slices of a segmentation, fine-tune on them (and
only them), read the engine's advice, keep or revert, cancel, paint from scratch on a new layer, save the
corrections."""

from __future__ import annotations

import html

import nibabel as nib
import numpy as np
import pytest
import torch
from gui_annotation import paint_slices, screenshot_shows_something
from gui_support import nca, phantom_copy, tiny_model_path, wait_for, work_unit  # noqa: F401 (fixtures)

from mednca.datasets import phantom_paths
from mednca.registry import list_models, load_model
from mednca.volume import read_volume
from napari_nca._colours import VERDICT_COLOURS
from napari_nca._layers import RESULT_KEY

pytestmark = pytest.mark.gui
CORRECTED = (14, 22)


@pytest.fixture
def corrected(nca, qtbot, work_unit):  # noqa: F811
    """The phantom segmented by the tiny model, two of its slices corrected by hand (from the truth)."""
    viewer, panel, image = nca
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    seg = viewer.layers["phantom_seg"]
    panel.tabs.setCurrentWidget(panel.finetune)
    assert panel.finetune.labels.value is seg  # the segmentation just made is what one corrects
    assert "No corrected axial slice" in panel.finetune.slices_label.text()
    truth = read_volume(phantom_paths()[1]).array
    paint_slices(seg, truth, CORRECTED)
    qtbot.waitUntil(lambda: "2 corrected axial slice(s): 14, 22" in panel.finetune.slices_label.text())
    return viewer, panel, image, seg


def run(qtbot, panel, work_unit, iterations):  # noqa: F811
    panel.finetune.advanced.set_expanded(True)
    panel.finetune.iterations.setValue(iterations)
    assert panel.finetune.start() is not None
    wait_for(qtbot, panel.progress, work_unit, units=iterations)


def shows_the_advice(panel, report) -> None:
    """The engine's advice is the readout, and the suggested button follows it."""
    text = panel.finetune.result_label.text()
    assert html.escape(report.advice[1:]) in text
    assert f"color:{VERDICT_COLOURS['ok' if report.recommended else 'check']}" in text
    assert panel.finetune.keep_button.isDefault() == report.recommended
    assert panel.finetune.revert_button.isDefault() == (not report.recommended)


def test_finetune_learns_the_corrected_slices_and_keep_makes_it_the_model(corrected, qtbot, work_unit, tmp_path):  # noqa: F811
    viewer, panel, _, seg = corrected
    painted = np.array(seg.data)
    run(qtbot, panel, work_unit, iterations=8)

    tuned = viewer.layers["phantom_seg_tuned"]
    np.testing.assert_array_equal(seg.data, painted)  # the user's corrections are untouched
    model, report, layer = panel.finetune.adapted
    assert layer is tuned and report.slices == list(CORRECTED)  # the corrected slices, not every labelled one
    assert [i for i, _ in panel.finetune.plot.losses] == list(range(1, 9))
    assert panel.finetune.keep_button.isEnabled() and panel.finetune.revert_button.isEnabled()
    shows_the_advice(panel, report)
    screenshot_shows_something(viewer, tmp_path / "finetune.png")

    panel.finetune.name_edit.setText("tiny-phantom")
    path = panel.finetune.keep()
    assert path is not None and path.is_file()
    assert "tiny-phantom" in [entry.name for entry in list_models()]
    assert panel.picker.combo.currentText() == "tiny-phantom"  # the adapted model is now the panel's model
    assert tuned.metadata[RESULT_KEY]["model"] == str(path)  # so Check quality judges that layer with it
    assert load_model("tiny-phantom").provenance["finetune"]["slices"] == list(CORRECTED)
    assert not panel.finetune.keep_button.isEnabled()


def test_revert_discards_the_model_and_its_layer(corrected, qtbot, work_unit, tiny_model_path, tmp_path):  # noqa: F811
    viewer, panel, _, seg = corrected
    run(qtbot, panel, work_unit, iterations=3)
    assert "phantom_seg_tuned" in viewer.layers
    panel.finetune.revert()
    assert "phantom_seg_tuned" not in viewer.layers and seg in viewer.layers
    assert panel.finetune.adapted is None and not panel.finetune.keep_button.isEnabled()
    assert [p.name for p in tiny_model_path.parent.iterdir()] == [tiny_model_path.name]
    screenshot_shows_something(viewer, tmp_path / "reverted.png")


def test_one_corrected_slice_cannot_show_the_model_is_better(nca, qtbot, work_unit):  # noqa: F811
    viewer, panel, _ = nca
    panel.segment.segment()
    wait_for(qtbot, panel.progress, work_unit)
    paint_slices(viewer.layers["phantom_seg"], read_volume(phantom_paths()[1]).array, (18,))
    run(qtbot, panel, work_unit, iterations=3)
    _, report, _ = panel.finetune.adapted
    assert report.slices == [18] and report.estimate_after is None and not report.recommended
    shows_the_advice(panel, report)  # Revert, not Keep, is the suggested choice


def test_cancel_leaves_the_model_unchanged(corrected, qtbot, work_unit, tiny_model_path, tmp_path):  # noqa: F811
    viewer, panel, _, _ = corrected
    model = panel.picker.current_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel.finetune.iterations.setValue(100_000)
    panel.finetune.start()
    qtbot.waitUntil(lambda: len(panel.finetune.plot.losses) >= 3, timeout=60_000)
    screenshot_shows_something(viewer, tmp_path / "running.png")
    panel.progress.cancel_button.click()
    wait_for(qtbot, panel.progress, work_unit)

    assert "Cancelled" in panel.finetune.result_label.text()
    assert "phantom_seg_tuned" not in viewer.layers
    assert panel.finetune.adapted is None and not panel.finetune.keep_button.isEnabled()
    after = panel.picker.current_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    on_disk = load_model(tiny_model_path).state_dict()
    assert all(torch.equal(before[k], on_disk[k]) for k in before)


def test_paint_from_scratch_on_a_new_layer_and_save_it(nca, qtbot, tmp_path, phantom_copy):  # noqa: F811
    viewer, panel, image = nca
    layer = panel.finetune.new_layer()
    assert layer.name == "phantom_labels" and not layer.data.any()
    assert viewer.layers.selection.active is layer and layer.mode == "paint"
    assert panel.finetune.labels.value is layer
    assert tuple(viewer.dims.displayed) == (0, 1)  # painting in the model's plane (axial)
    truth = read_volume(phantom_paths()[1]).array
    paint_slices(layer, truth, (10,))
    qtbot.waitUntil(lambda: "1 labelled axial slice(s): 10" in panel.finetune.slices_label.text())

    out = tmp_path / "corrected.nii.gz"
    assert panel.finetune.save(out)
    saved = nib.load(out)
    np.testing.assert_allclose(saved.affine, nib.load(phantom_copy).affine)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), layer.data)
    assert not panel.finetune.save(phantom_copy)  # never over the scan itself
    assert nib.load(phantom_copy).get_fdata().std() > 0
