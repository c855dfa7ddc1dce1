"""What the command-line tests share: a tiny model file, small scans and a toy Decathlon task folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mednca.checkpoint import save_model
from mednca.model import MedNCA, NCAConfig

AFFINE = np.array([[0, 0, 1.5, -20], [-1.1, 0, 0, 30], [0, 0.9, 0, 5], [0, 0, 0, 1]], float)
SHAPE = (12, 14, 9)


def tiny_model_file(path: Path, classes: tuple[str, ...] = ("foreground",)) -> Path:
    """A small random model (it segments something, fast): the CLI's behaviour, not its accuracy, is tested."""
    torch.manual_seed(0)
    config = NCAConfig(channels=8, hidden=16, steps=(2, 3), input_size=(16, 16), output_channels=len(classes),
                       class_names=classes)
    model = MedNCA(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return save_model(model, path)


def write_scan(path: Path, seed: int = 0, shape=SHAPE) -> Path:
    """A noisy scan (NIfTI, or NRRD / MetaImage by the name's extension) on an oblique-free, permuted grid."""
    data = np.random.default_rng(seed).normal(50, 10, shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii.gz", ".nii")):
        nib.save(nib.Nifti1Image(data, AFFINE), path)
    else:
        from mednca.volume import Volume, write_volume

        write_volume(Volume(data, AFFINE), path)
    return path


def make_task(folder: Path, n_cases: int = 3, shape=(18, 16, 5)) -> Path:
    """A Decathlon task folder of small two-class cases: class 1 a bright block, class 2 a dim one beside it."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for i in range(n_cases):
        name = f"toy_{i + 1:03d}"
        rng = np.random.default_rng(i)
        lab = np.zeros(shape, np.uint8)
        lab[3 + i : 9 + i, 3:7] = 1
        lab[3 + i : 9 + i, 7:11] = 2
        img = rng.normal(0, 0.1, shape).astype(np.float32) + (lab == 1) + 0.5 * (lab == 2)
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), folder / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    index = {"name": "toy", "licence": "CC0", "labels": {"0": "background", "1": "A", "2": "B"}, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(index))
    return folder
