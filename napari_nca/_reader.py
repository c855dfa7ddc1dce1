"""Opening scans and label maps in napari with their physical geometry.

Layers get the voxel spacing as scale and the origin as translate, so napari's measurements are in
millimetres, and carry the full geometry in their metadata (see ``_layers``) for segmentation and saving.
A label map opens as a Labels layer: recognised by its name ("label", "seg", "mask") or by holding integers
with few distinct values, as MSD ``labelsTr`` files do; its classes get the colours a segmentation of them
gets. A scan opens with its contrast set from its own 0.5 and 99.5 percentiles (a scanner's full range
would leave the anatomy dim), as a radiology viewer's default window does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from mednca.errors import VolumeError
from mednca.volume import ITK_SUFFIXES, NIFTI_SUFFIXES, Volume, check_labels, is_dicom_file, read_volume

from ._colours import labels_colormap
from ._layers import layer_kwargs

SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LABEL_NAME = re.compile(r"label|seg|mask", re.IGNORECASE)
MAX_LABEL_VALUES = 16  # an integer scan has hundreds of grey values; a label map has a handful of classes
DICOM_PROBE = 20  # files looked at when deciding whether a folder holds DICOM
CONTRAST_PERCENTILES = (0.5, 99.5)
CONTRAST_SAMPLE = 1_000_000  # voxels looked at for the contrast: plenty for two percentiles, fast on any scan


def get_reader(path: str | os.PathLike | list):
    """The reader for ``path`` (a scan file, a DICOM series folder or one of its files, or a list of them), or None when
    napari-nca does not read it, so that napari can try other plugins."""
    paths = path if isinstance(path, list | tuple) else [path]
    if not paths or not all(_readable(Path(p)) for p in paths):
        return None
    return read_scans


def read_scans(path: str | os.PathLike | list) -> list[tuple]:
    """Layer data tuples for each path. A damaged file raises ``VolumeError`` naming it (napari shows it)."""
    paths = path if isinstance(path, list | tuple) else [path]
    return [volume_layer_data(read_volume(p), _layer_name(Path(p))) for p in paths]


def volume_layer_data(volume: Volume, name: str) -> tuple:
    """``(data, kwargs, layer_type)`` for a volume: a Labels layer for a label map, an Image otherwise."""
    if is_label_map(volume, name):
        labels = volume.like(check_labels(volume.array, volume))  # keeps the file as a source not to overwrite
        colours = labels_colormap(int(labels.array.max(initial=0)))
        return labels.array, {"name": name, "colormap": colours, **layer_kwargs(labels)}, "labels"
    kwargs = {"name": name, **layer_kwargs(volume)}
    limits = contrast_limits(volume.array)
    if limits is not None:
        kwargs["contrast_limits"] = limits
    return volume.array, kwargs, "image"


def contrast_limits(array: np.ndarray) -> tuple[float, float] | None:
    """The display window from the scan's 0.5 and 99.5 percentiles (over finite voxels, sampled evenly on
    large scans); None when they coincide, leaving napari's own choice."""
    sample = array.ravel()[:: max(1, array.size // CONTRAST_SAMPLE)]
    sample = sample[np.isfinite(sample)] if np.issubdtype(sample.dtype, np.floating) else sample
    if sample.size == 0:
        return None
    low, high = (float(v) for v in np.percentile(sample, CONTRAST_PERCENTILES))
    return (low, high) if high > low else None


def is_label_map(volume: Volume, name: str) -> bool:
    array = volume.array
    if array.dtype == bool:
        return True
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0:
            return False
        return bool(LABEL_NAME.search(name)) or _few_values(array)
    if LABEL_NAME.search(name) and np.issubdtype(array.dtype, np.floating):
        try:  # a label map stored as floats: whole, non-negative numbers only
            check_labels(array, volume)
        except VolumeError:
            return False
        return True
    return False


def _few_values(array: np.ndarray) -> bool:
    """At most MAX_LABEL_VALUES distinct values; a sample of the voxels rules out most scans quickly."""
    sample = array.ravel()[:: max(1, array.size // 100_000)]
    if len(np.unique(sample)) > MAX_LABEL_VALUES:
        return False
    return len(np.unique(array)) <= MAX_LABEL_VALUES


def _layer_name(path: Path) -> str:
    if path.is_file() and is_dicom_file(path):
        return path.parent.name  # one file stands for its series, which is named by its folder
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _readable(path: Path) -> bool:
    if path.is_dir():
        return _holds_dicom(path)
    return path.name.lower().endswith(SUFFIXES) or is_dicom_file(path)


def _holds_dicom(folder: Path) -> bool:
    """True when one of the first files of the folder is DICOM (by name or by content)."""
    try:
        files = [f for f in sorted(folder.iterdir())[: DICOM_PROBE * 5] if f.is_file()][:DICOM_PROBE]
    except OSError:
        return False
    return any(is_dicom_file(f) for f in files)
