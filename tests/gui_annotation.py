"""What the fine-tune, train and responsiveness GUI tests add to ``gui_support``: the shipped phantom as
layers, "painting" slices of its ground truth as a user with a brush would, and a screenshot check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gui_support import assert_not_blank

from mednca.datasets import phantom_paths
from mednca.volume import read_volume
from napari_nca._layers import layer_kwargs


def add_phantom(viewer):
    """The shipped phantom as an Image layer "phantom"; returns (layer, ground-truth label array)."""
    image_path, label_path = phantom_paths()
    volume = read_volume(image_path)
    layer = viewer.add_image(volume.array, name="phantom", **layer_kwargs(volume))
    return layer, read_volume(label_path).array


def paint_slices(layer, truth: np.ndarray, slices, axis: int = 2) -> None:
    """Copy the ground truth of ``slices`` into a Labels layer as the brush does: through ``data_setitem``,
    which writes the undo history and tells listeners that the user painted."""
    for s in slices:
        region = np.zeros(layer.data.shape, bool)
        index = [slice(None)] * 3
        index[axis] = s
        region[tuple(index)] = True
        where = np.nonzero(region)
        layer.data_setitem(where, truth[where])


def screenshot_shows_something(viewer, path: Path) -> None:
    """Save the window with its dock widgets to ``path`` and check the picture is not blank."""
    shot = viewer.window.screenshot(str(path), canvas_only=False, flash=False)
    assert path.is_file()
    assert_not_blank(np.asarray(shot))
