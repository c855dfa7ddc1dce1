"""Make the README's pictures by driving the plugin as a user would, on the shipped phantom.

Uses the shipped hippocampus model when the package has one, else the Med-NCA authors' checkpoint from the
shared folder beside the repository. Run under a display (or ``xvfb-run -a``):

    .venv/bin/python docs/make_screenshots.py

Writes docs/images/segmentation.png, growth.gif, quality.png and finetune.png. ``--scan FILE`` uses another
scan instead of the phantom (the authors' model was trained on real MRI and finds little in the phantom);
fine-tuning then needs ``--labels FILE``, the scan's label map, from which two slices are "painted".
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
from mednca.registry import SHIPPED_DIR
from mednca.volume import read_volume
from napari_nca._layers import VOLUME_KEY

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
REFERENCE = Path(os.environ.get("MEDNCA_SHARED", REPO.parent / "shared")) / "reference" / "mednca_hippocampus"


def model_path() -> Path:
    shipped = SHIPPED_DIR / "hippocampus.safetensors"
    if shipped.is_file():
        return shipped
    if REFERENCE.is_dir():
        return REFERENCE
    sys.exit(f"no model: neither {shipped} nor the authors' checkpoint at {REFERENCE} exists")


def wait(panel) -> None:
    while panel.busy:
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()


def open_scan(viewer, scan: Path):
    [image] = viewer.open(str(scan), plugin="napari-nca")
    return image


def busiest_slice(labels: np.ndarray, axis: int) -> int:
    """The slice with most segmented voxels: the place a reader wants to see."""
    return int(np.argmax((labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))))


def setup(viewer, widget_name: str):
    _, widget = viewer.window.add_plugin_dock_widget("napari-nca", widget_name)
    widget.picker.set_path(model_path())
    return widget


def segmentation_and_growth(out: Path, scan: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1300, 850)
    image = open_scan(viewer, scan)
    widget = setup(viewer, "Segment")
    widget.with_probabilities.value = True
    widget.segment()
    wait(widget.progress)
    seg = viewer.layers[f"{image.name} segmentation"]
    axis = slice_axis(widget.picker.current_model(), seg.metadata[VOLUME_KEY])
    viewer.dims.set_current_step(viewer.dims.ndim - 3 + axis, busiest_slice(seg.data, axis))
    viewer.reset_view()
    viewer.window.screenshot(str(out / "segmentation.png"), canvas_only=False)

    for layer in list(viewer.layers)[1:]:  # the growth alone over the scan
        layer.visible = False
    widget.record_growth()
    wait(widget.progress)
    viewer.reset_view()
    widget.export_animation(out / "growth.gif", fps=6)
    viewer.close()


def quality(out: Path, scan: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1300, 850)
    open_scan(viewer, scan)
    widget = setup(viewer, "Quality")
    widget.compute()
    wait(widget.progress)
    first = widget.slices.item(0)
    if first is not None:
        widget.slices.setCurrentItem(first)
        widget.go_to_slice(first)
    viewer.reset_view()
    viewer.window.screenshot(str(out / "quality.png"), canvas_only=False)
    viewer.close()


def finetune(out: Path, scan: Path, labels: Path, iterations: int = 40) -> None:
    """Paint two slices from the label map, as a user correcting a prediction would, fine-tune, and show the
    adapted model's segmentation on a slice it was not shown, with the loss curve and the Dice."""
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1300, 950)
    image = open_scan(viewer, scan)
    truth = read_volume(labels).array
    widget = setup(viewer, "Fine-tune")
    axis = slice_axis(widget.picker.current_model(), read_volume(scan))
    labelled = np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != axis)))
    painted = [int(labelled[len(labelled) // 3]), int(labelled[2 * len(labelled) // 3])]
    annotation = np.zeros_like(truth)
    for s in painted:
        np.put_along_axis(annotation, np.full([1 if a == axis else n for a, n in enumerate(truth.shape)], s),
                          np.take(truth, [s], axis=axis), axis=axis)
    annotation_layer = viewer.add_labels(annotation, name="annotation", scale=image.scale, translate=image.translate)
    widget.image.value, widget.labels.value = image, annotation_layer
    widget.iterations.value = iterations
    widget.start()
    wait(widget.progress)
    annotation_layer.visible = False
    viewer.dims.set_current_step(viewer.dims.ndim - 3 + axis, (painted[0] + painted[1]) // 2)
    viewer.reset_view()
    QApplication.processEvents()
    viewer.window.screenshot(str(out / "finetune.png"), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    import napari._qt.qt_main_window as main_window

    main_window.SHOW_QT_WARNING = False  # its toast (PyQt5 deprecation) would cover the canvas
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=phantom_paths()[0], help="scan to show (default: phantom)")
    parser.add_argument("--labels", type=Path, help="label map of --scan, for the fine-tuning picture")
    parser.add_argument("--only", choices=["segmentation", "quality", "finetune"], help="make one picture only")
    args = parser.parse_args()
    if args.labels is None and args.scan == phantom_paths()[0]:
        args.labels = phantom_paths()[1]
    IMAGES.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "segmentation"):
        segmentation_and_growth(IMAGES, args.scan)
    if args.only in (None, "quality"):
        quality(IMAGES, args.scan)
    if args.only in (None, "finetune"):
        if args.labels is None:
            print("no --labels for this scan: the fine-tuning picture is skipped")
        else:
            finetune(IMAGES, args.scan, args.labels)
    print("\n".join(str(p) for p in sorted(IMAGES.iterdir())))
