"""What the GUI test modules share: a tiny fast model in a temporary user model folder, the phantom copied
where it may be written beside, and a check that a screenshot shows something."""

from __future__ import annotations

import shutil

import numpy as np
import pytest


@pytest.fixture
def tiny_model_path(tmp_path, monkeypatch):
    """A small untrained Med-NCA (4+4 steps) saved as a user model: fast enough for end-to-end GUI runs."""
    import torch

    from mednca.model import MedNCA, NCAConfig
    from mednca.registry import save_user_model

    monkeypatch.setenv("MEDNCA_MODELS_DIR", str(tmp_path / "models"))
    torch.manual_seed(0)
    return save_user_model(MedNCA(NCAConfig(channels=8, hidden=16, steps=(4, 4))), "tiny")


@pytest.fixture
def phantom_copy(tmp_path):
    from mednca.datasets import phantom_paths

    target = tmp_path / "phantom.nii.gz"
    shutil.copy(phantom_paths()[0], target)
    return target


def assert_not_blank(image: np.ndarray, min_colours: int = 50) -> None:
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 10, "the screenshot is (nearly) uniform"
    assert len(np.unique(rgb, axis=0)) > min_colours, "the screenshot has too few colours"


def wait_for(qtbot, panel, timeout=30000):
    qtbot.waitUntil(lambda: not panel.busy, timeout=timeout)
