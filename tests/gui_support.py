"""What the GUI test modules share: a tiny fast model in a temporary user model folder, the phantom copied
where it may be written beside, the napari-nca panel docked in a shown viewer, a check that a screenshot
shows something, and waiting for real work with a time-out scaled to this machine's speed right now.

The test machine is shared and often loaded: a fixed time-out that holds on an idle laptop fails on a busy
2-core box. ``work_unit`` measures once per session how long the tiny model takes to segment the phantom
here, and every wait for a run allows a generous multiple of that (never less than ``MIN_TIMEOUT_S``): the
time-outs only catch runs that hang, never slow ones.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

MIN_TIMEOUT_S = 60
SLACK = 40  # a run's time-out: this many times its expected duration on the machine as measured


def tiny_model():
    """A small untrained Med-NCA (4+4 steps): fast enough for end-to-end GUI runs."""
    import torch

    from mednca.model import MedNCA, NCAConfig

    torch.manual_seed(0)
    return MedNCA(NCAConfig(channels=8, hidden=16, steps=(4, 4)))


@pytest.fixture
def tiny_model_path(tmp_path, monkeypatch):
    """The tiny model saved as a user model "tiny" in a temporary model folder."""
    from mednca.registry import save_user_model

    monkeypatch.setenv("MEDNCA_MODELS_DIR", str(tmp_path / "models"))
    return save_user_model(tiny_model(), "tiny")


@pytest.fixture
def phantom_copy(tmp_path):
    from mednca.datasets import phantom_paths

    target = tmp_path / "phantom.nii.gz"
    shutil.copy(phantom_paths()[0], target)
    return target


@pytest.fixture(scope="session")
def work_unit() -> float:
    """Seconds the tiny model takes to segment the phantom on one thread, on this machine, now."""
    from mednca.datasets import phantom_paths
    from mednca.inference import segment
    from mednca.volume import read_volume

    model, volume = tiny_model(), read_volume(phantom_paths()[0])
    segment(model, volume, threads=1)  # the first run pays for imports and allocations
    start = time.perf_counter()
    segment(model, volume, threads=1)
    return time.perf_counter() - start


def timeout_ms(work_unit: float, units: float = 1.0) -> int:
    """A time-out for work expected to take ``units`` phantom segmentations."""
    return int(1000 * max(MIN_TIMEOUT_S, SLACK * units * work_unit))


def wait_for(qtbot, progress, work_unit: float, units: float = 1.0) -> None:
    """Wait until the panel's run has finished (see ``timeout_ms``)."""
    qtbot.waitUntil(lambda: not progress.busy, timeout=timeout_ms(work_unit, units))


def open_panel(viewer, monkeypatch):
    """The napari-nca panel as ``napari -w napari-nca`` docks it, its runs on one torch thread whatever the
    machine's load (OpenMP threads waiting for busy cores make a run many times slower)."""
    monkeypatch.setattr("napari_nca._qt.panel.default_threads", lambda: 1)
    _, panel = viewer.window.add_plugin_dock_widget("napari-nca")
    return panel


@pytest.fixture
def nca(make_napari_viewer, phantom_copy, tiny_model_path, monkeypatch):
    """(viewer, panel, scan layer): the phantom opened from a file, the panel docked, the tiny model chosen."""
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(phantom_copy), plugin="napari-nca")
    panel = open_panel(viewer, monkeypatch)
    panel.picker.set_path(tiny_model_path)
    return viewer, panel, image


def assert_not_blank(image: np.ndarray, min_colours: int = 50) -> None:
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 10, "the screenshot is (nearly) uniform"
    assert len(np.unique(rgb, axis=0)) > min_colours, "the screenshot has too few colours"
