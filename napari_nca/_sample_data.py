"""Sample data for the File > Open Sample menu: the synthetic phantom shipped with the package (works
offline) and one real MSD hippocampus case, downloaded once and cached."""

from __future__ import annotations

from mednca.datasets import fetch_decathlon_case, phantom_paths
from mednca.volume import read_volume

from ._reader import _layer_name, volume_layer_data


def phantom() -> list[tuple]:
    """The phantom scan as an Image layer and its reference labels as a Labels layer."""
    return _image_and_labels(phantom_paths())


def decathlon_case() -> list[tuple]:
    """MSD case hippocampus_367 (image and labels). Without network and cache, raises the engine's
    ``MedNCAError`` saying how to get the file, which napari shows as a notification."""
    return _image_and_labels(fetch_decathlon_case())


def _image_and_labels(paths) -> list[tuple]:
    image_path, label_path = paths
    image = volume_layer_data(read_volume(image_path), _layer_name(image_path))
    labels = read_volume(label_path)
    data, kwargs, _ = volume_layer_data(labels, _layer_name(image_path) + " reference labels")
    kwargs["opacity"] = 0.5
    return [image, (data, kwargs, "labels")]
