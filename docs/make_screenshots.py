"""Make the README's pictures by driving the napari-nca panel as a user would, in a 1366x768 window.

By default on a real hippocampus MRI that the shipped model never trained on (MSD Task04 hippocampus_056, one
of its held-out validation cases, from the shared data folder beside the repository), else on the shipped
synthetic phantom. Run under a display (or ``xvfb-run -a``):

    .venv/bin/python docs/make_screenshots.py

Writes docs/images/segmentation.png, growth.gif, quality.png and finetune.png. ``--scan FILE`` uses another
scan; fine-tuning then needs ``--labels FILE``, the scan's label map, from which two slices are "painted" as
corrections on the segmentation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from mednca.datasets import phantom_paths
from mednca.inference import slice_axis
from mednca.volume import read_volume
from napari_nca._layers import VOLUME_KEY

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
HIPPOCAMPUS = Path(os.environ.get("MEDNCA_SHARED", REPO.parent / "shared")) / "data" / "hippocampus"
HELD_OUT_CASE = "hippocampus_056.nii.gz"
WINDOW = (1366, 768)


def default_scan() -> tuple[Path, Path]:
    image, labels = HIPPOCAMPUS / "imagesTr" / HELD_OUT_CASE, HIPPOCAMPUS / "labelsTr" / HELD_OUT_CASE
    if image.is_file() and labels.is_file():
        return image, labels
    print(f"{image} not found: using the synthetic phantom")
    return phantom_paths()


def wait(panel) -> None:
    while panel.progress.busy:
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()


def open_viewer(scan: Path):
    """A 1366x768 viewer with the scan and the panel, as ``napari -w napari-nca`` opens it."""
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(*WINDOW)
    [image] = viewer.open(str(scan), plugin="napari-nca")
    _, panel = viewer.window.add_plugin_dock_widget("napari-nca")
    return viewer, panel, image


def busiest_slice(labels: np.ndarray, axis: int) -> int:
    """The slice with most segmented voxels: the place a reader wants to see."""
    return int(np.argmax((labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))))


def show_slice(viewer, layer, axis: int, index: int) -> None:
    viewer.dims.set_current_step(viewer.dims.ndim - 3 + axis, index)
    viewer.reset_view()
    QApplication.processEvents()


def segmentation_and_growth(out: Path, scan: Path) -> None:
    viewer, panel, image = open_viewer(scan)
    panel.segment.segment()
    wait(panel)
    seg = viewer.layers[f"{image.name}_seg"]
    shown_axis = int(viewer.dims.order[-3]) - (viewer.dims.ndim - 3)  # the slider's axis: the view was kept
    show_slice(viewer, seg, shown_axis, busiest_slice(seg.data, shown_axis))
    viewer.window.screenshot(str(out / "segmentation.png"), canvas_only=False)

    model_axis = slice_axis(panel.picker.current_model(), seg.metadata[VOLUME_KEY])
    viewer.dims.set_current_step(viewer.dims.ndim - 3 + model_axis, busiest_slice(seg.data, model_axis))
    panel.segment.record_growth()  # of the slice in the model's plane; the results hide meanwhile
    wait(panel)
    viewer.reset_view()
    panel.segment.export_animation(out / "growth.gif", fps=6)
    viewer.close()


def quality(out: Path, scan: Path) -> None:
    viewer, panel, image = open_viewer(scan)
    panel.tabs.setCurrentWidget(panel.quality)
    panel.quality.compute()
    wait(panel)
    step = panel.quality
    if step.slices.count():
        step.slices.setCurrentRow(0)
        step.go_to_item(step.slices.item(0))
    else:
        axis = step.report.axis
        step.go_to(busiest_slice(step.report.labels.array, axis))
    viewer.reset_view()
    QApplication.processEvents()
    viewer.window.screenshot(str(out / "quality.png"), canvas_only=False)
    viewer.close()


def finetune(out: Path, scan: Path, labels: Path) -> None:
    """Segment, correct two slices of the segmentation from the label map (as a user painting would),
    fine-tune, and show the adapted model's segmentation on a slice it was not shown, with the advice."""
    viewer, panel, image = open_viewer(scan)
    panel.segment.segment()
    wait(panel)
    seg = viewer.layers[f"{image.name}_seg"]
    truth = read_volume(labels).array
    axis = slice_axis(panel.picker.current_model(), seg.metadata[VOLUME_KEY])
    labelled = np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != axis)))
    painted = [int(labelled[len(labelled) // 3]), int(labelled[2 * len(labelled) // 3])]
    for s in painted:
        where = [slice(None)] * 3
        where[axis] = s
        region = np.zeros(truth.shape, bool)
        region[tuple(where)] = True
        seg.data_setitem(np.nonzero(region), truth[region])
    panel.tabs.setCurrentWidget(panel.finetune)
    panel.finetune.show_annotated_slices()
    panel.finetune.start()
    wait(panel)
    QApplication.processEvents()
    seg.visible = False
    panel.finetune.paint()  # the view in the model's plane, as the user painted it
    seg.mode = "pan_zoom"
    viewer.layers.selection.active = viewer.layers[f"{image.name}_seg_tuned"]
    show_slice(viewer, seg, axis, (painted[0] + painted[1]) // 2)
    time.sleep(0.6)  # the loss plot redraws on a timer
    QApplication.processEvents()
    viewer.window.screenshot(str(out / "finetune.png"), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    import napari._qt.qt_main_window as main_window

    main_window.SHOW_QT_WARNING = False  # its toast (PyQt5 deprecation) would cover the canvas
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, help="scan to show (default: a held-out MSD case, else the phantom)")
    parser.add_argument("--labels", type=Path, help="label map of --scan, for the fine-tuning picture")
    parser.add_argument("--only", choices=["segmentation", "quality", "finetune"], help="make one picture only")
    args = parser.parse_args()
    if args.scan is None:
        args.scan, args.labels = default_scan()
    IMAGES.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "segmentation"):
        segmentation_and_growth(IMAGES, args.scan)
    if args.only in (None, "quality"):
        quality(IMAGES, args.scan)
    if args.only in (None, "finetune"):
        if args.labels is None:
            sys.exit("no --labels for this scan: the fine-tuning picture needs the scan's label map")
        finetune(IMAGES, args.scan, args.labels)
    print("\n".join(str(p) for p in sorted(IMAGES.iterdir())))
