"""Shared pieces of the GUI tests: a tiny fast model in a throw-away user model folder, the phantom scan as
layers, and a check that a screenshot shows something.

The tests run the engine inside ``torch_threads(1)``: the test machine's cores are shared, and OpenMP
threads waiting for busy cores make a run many times slower than a single thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mednca.datasets import phantom_paths
from mednca.model import NCAConfig
from mednca.preprocess import Preprocessing
from mednca.registry import save_user_model
from mednca.training import new_model
from mednca.volume import read_volume
from napari_nca._layers import layer_kwargs

TINY = NCAConfig(channels=8, hidden=16, steps=(4, 4), output_channels=2, class_names=("anterior", "posterior"))


def tiny_model_folder(monkeypatch, tmp_path: Path, name: str = "tiny") -> Path:
    """Point the user model folder at ``tmp_path`` and put a tiny seeded model there; returns its file."""
    folder = tmp_path / "models"
    monkeypatch.setenv("MEDNCA_MODELS_DIR", str(folder))
    return save_user_model(new_model(TINY, Preprocessing(), seed=0), name)


def add_phantom(viewer):
    """The shipped phantom as an Image layer "phantom"; returns (layer, ground-truth label array)."""
    image_path, label_path = phantom_paths()
    volume = read_volume(image_path)
    layer = viewer.add_image(volume.array, name="phantom", **layer_kwargs(volume))
    return layer, read_volume(label_path).array


def paint_slices(layer, truth: np.ndarray, slices, axis: int = 2) -> None:
    """Copy the ground truth of ``slices`` into a Labels layer, as a user with a brush would."""
    data = np.array(layer.data)
    for s in slices:
        index = [slice(None)] * 3
        index[axis] = s
        data[tuple(index)] = truth[tuple(index)]
    layer.data = data


def assert_screenshot_shows_something(viewer, path: Path) -> np.ndarray:
    """Save the window with its dock widgets and check the picture is not blank."""
    shot = viewer.window.screenshot(str(path), canvas_only=False, flash=False)
    rgb = np.asarray(shot)[..., :3]
    colours = np.unique(rgb.reshape(-1, 3)[:: max(1, rgb.size // 3 // 200_000)], axis=0)
    assert path.is_file()
    assert rgb.std() > 10, f"screenshot {path} is nearly uniform (std {rgb.std():.1f})"
    assert len(colours) > 50, f"screenshot {path} has only {len(colours)} colours"
    return rgb
