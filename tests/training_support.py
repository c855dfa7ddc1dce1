"""What the training and fine-tuning tests share: a tiny architecture, a toy labelled case, weight snapshots."""

from __future__ import annotations

import numpy as np
import torch

from mednca.model import MedNCA, NCAConfig
from mednca.volume import Volume

TINY = NCAConfig(channels=8, hidden=16, steps=(4, 4), input_size=(16, 16), output_channels=2,
                 class_names=("a", "b"))


def toy_case(seed: int, shape=(20, 20, 6)) -> tuple[Volume, Volume]:
    """A bright square (class 1) beside a dim one (class 2) on noise, at a random place."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.1, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    r, c = rng.integers(2, 8, 2)
    lab[r : r + 8, c : c + 4] = 1
    lab[r : r + 8, c + 4 : c + 8] = 2
    img[lab == 1] += 1.0
    img[lab == 2] += 0.5
    return Volume(img, np.eye(4)), Volume(lab, np.eye(4))


def weights(model: MedNCA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
