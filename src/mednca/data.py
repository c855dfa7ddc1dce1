"""Training data: labelled volumes turned into model-space slices, split into training and validation by case.

Slices are prepared exactly as inference prepares them (``prepare_slices`` along the model's axis), so a
model sees the same kind of input when it is trained and when it is used. Labels are resized with
nearest-neighbour (a label is never interpolated) and stored one-hot for the classes 1..K. The split is by
case, never by slice: neighbouring slices of one scan are nearly identical, so a slice-level split would
report the Dice of scans the model has already seen.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedNCAError
from .model import NCAConfig
from .orientation import Reorientation
from .preprocess import Preprocessing, scan_inputs
from .volume import Volume, check_labels, image_array, read_volume

Pair = tuple["Volume | str | os.PathLike", "Volume | str | os.PathLike"]


@dataclass
class Case:
    """One labelled scan, read and validated."""

    case_id: str
    image: np.ndarray  # float32, as image_array returns it, in the orientation it was loaded for
    labels: np.ndarray  # integer class per voxel, same shape


@dataclass
class SliceSet:
    """Model-space slices of several cases: ``images [N, C, h, w]`` float32 in [0, 1] (the model's inputs: the
    slice, or the slice in the centre of its ``C // 2`` neighbours on each side), ``labels [N, K, h, w]`` uint8
    one-hot for classes 1..K, and the case each slice came from (an index into ``case_ids``)."""

    images: torch.Tensor
    labels: torch.Tensor
    case_index: torch.Tensor
    case_ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def pick(self, index: torch.Tensor) -> SliceSet:
        """The slices at ``index`` (case numbering unchanged)."""
        return SliceSet(self.images[index], self.labels[index], self.case_index[index], self.case_ids)

    def subset(self, cases: Sequence[int]) -> SliceSet:
        """The slices of the given case indices (renumbered), in their original order."""
        cases = list(cases)
        keep = torch.isin(self.case_index, torch.tensor(cases, dtype=torch.long))
        remap = torch.full((len(self.case_ids),), -1, dtype=torch.long)
        remap[cases] = torch.arange(len(cases))
        return SliceSet(
            self.images[keep], self.labels[keep], remap[self.case_index[keep]], [self.case_ids[c] for c in cases]
        )


def decathlon_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """The (image, label) files of a Medical Segmentation Decathlon task folder, as its dataset.json lists them."""
    folder = Path(folder)
    index = folder / "dataset.json"
    if not index.is_file():
        raise MedNCAError(f"{folder} is not a Decathlon task folder: it has no dataset.json")
    try:
        entries = json.loads(index.read_text())["training"]
        pairs = [(folder / e["image"], folder / e["label"]) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MedNCAError(f"{index} does not list training cases as Decathlon does ({e})") from None
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise MedNCAError(f"{index} lists {len(missing)} missing files, e.g. {missing[0]}")
    if not pairs:
        raise MedNCAError(f"{index} lists no training cases")
    return pairs


def load_cases(data: str | os.PathLike | Sequence[Pair], orientation: str = "RAS") -> list[Case]:
    """Read a Decathlon folder, or a list of (image, label) pairs given as Volumes or paths, each brought to
    ``orientation`` (the model's axis codes): cases stored in different index orders train one model."""
    cases = []
    for cid, image, label in data_pairs(data):
        image, label = (p if isinstance(p, Volume) else read_volume(p) for p in (image, label))
        to_model = Reorientation.between(image.affine, orientation).to_model
        labels = check_labels(label, image)
        cases.append(Case(cid, np.ascontiguousarray(to_model(image_array(image))),
                          np.ascontiguousarray(to_model(labels))))
    return cases


def data_pairs(data) -> list[tuple[str, Volume | Path, Volume | Path]]:
    """``(case id, image, label)`` for a Decathlon folder or a list of pairs; nothing is read yet."""
    if isinstance(data, str | os.PathLike):
        folder = Path(data)
        if not folder.is_dir():
            raise MedNCAError(f"data folder not found: {folder}")
        pairs: list = decathlon_pairs(folder)
    else:
        pairs = list(data)
    if not pairs:
        raise MedNCAError("no labelled cases given")
    out = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise MedNCAError(f"case {i} must be an (image, label) pair")
        image, label = (p if isinstance(p, Volume) else Path(p) for p in pair)
        out.append((case_id(image, i), image, label))
    ids = [c for c, _, _ in out]
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise MedNCAError(f"several cases share the id(s) {dup}; case ids come from the image file names")
    return out


def case_id(image: Volume | str | os.PathLike, index: int) -> str:
    """A case's id: its image file name without ``.nii.gz`` / ``.nii``, or ``case_<index>`` for a volume
    made in memory. Training records validation cases by this id, and evaluation selects them by it."""
    source = image.source if isinstance(image, Volume) else image
    if source is None:
        return f"case_{index:04d}"
    return Path(source).name.removesuffix(".gz").removesuffix(".nii")


def dataset_config(folder: str | os.PathLike) -> NCAConfig:
    """The default architecture with the classes named in dataset.json ("labels": {"1": "Anterior", ...});
    one "foreground" class (every label > 0) when it names none."""
    try:
        labels = _dataset_index(folder).get("labels", {})
        classes = sorted((int(k), str(v).lower()) for k, v in labels.items() if int(k) > 0)
    except (ValueError, AttributeError):
        classes = []
    names = tuple(name for _, name in classes) or ("foreground",)
    return NCAConfig(output_channels=len(names), class_names=names)


def dataset_provenance(folder: str | os.PathLike) -> dict:
    """What a model records about its training data: the task's name and licence from dataset.json (the
    licence of the data travels with weights trained on it)."""
    index = _dataset_index(folder)
    described = {k: str(index[k]) for k in ("name", "licence", "license", "reference") if k in index}
    return {"training_data": described or {"name": Path(folder).name}}


def _dataset_index(folder: str | os.PathLike) -> dict:
    """dataset.json's contents, or {} (decathlon_pairs reports an unreadable dataset.json precisely)."""
    try:
        index = json.loads((Path(folder) / "dataset.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def case_slices(
    image: np.ndarray, labels: np.ndarray, config: NCAConfig, prep: Preprocessing
) -> tuple[torch.Tensor, torch.Tensor]:
    """One volume in the model's orientation -> model inputs ``[n, prep.input_channels, h, w]`` (each slice with
    its neighbours, as inference prepares them) and one-hot labels ``[n, K, h, w]`` (uint8), slicing along
    ``prep.axis``. With one output class, every label > 0 is foreground (the whole structure)."""
    k = config.output_channels
    top = int(labels.max(initial=0))
    if k > 1 and top > k:
        raise MedNCAError(f"the labels hold class {top}, but the model has only {k} output classes")
    lab = torch.from_numpy(np.moveaxis(np.asarray(labels), prep.axis, 0).astype(np.int64))
    inputs = scan_inputs(np.asarray(image, np.float32), prep.axis, config.input_size, prep)
    classes = torch.arange(1, k + 1).view(1, k, 1, 1)
    onehot = (lab.unsqueeze(1) > 0) if k == 1 else (lab.unsqueeze(1) == classes)
    onehot = F.interpolate(onehot.to(torch.uint8), size=config.input_size, mode="nearest")
    return inputs, onehot


def build_slices(cases: Sequence[Case], config: NCAConfig, prep: Preprocessing) -> SliceSet:
    """All slices of all cases, in one set."""
    images, labels, index = [], [], []
    for i, case in enumerate(cases):
        x, y = case_slices(case.image, case.labels, config, prep)
        images.append(x)
        labels.append(y)
        index.append(torch.full((x.shape[0],), i, dtype=torch.long))
    return SliceSet(torch.cat(images), torch.cat(labels), torch.cat(index), [c.case_id for c in cases])


def split_cases(n_cases: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of case indices into (training, validation); at least one case on each side when
    ``val_fraction > 0`` and there are two cases or more."""
    if not 0.0 <= val_fraction < 1.0:
        raise MedNCAError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(n_cases))
    random.Random(seed).shuffle(order)
    n_val = round(n_cases * val_fraction)
    if val_fraction > 0 and n_cases >= 2:
        n_val = min(max(n_val, 1), n_cases - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])

