"""Saving Labels and Image layers in the geometry of the scan they belong to.

The volume in the layer's metadata (see ``_layers``) supplies the affine and NIfTI header, so a saved
segmentation lies exactly on its scan in any other viewer. The engine refuses to write over the file the
data came from; napari shows that message. The format follows the extension (.nii.gz, .nii, .nrrd, .mha).
"""

from __future__ import annotations

import os

from mednca.volume import write_volume

from ._layers import volume_from_data


def write_labels(path: str | os.PathLike, data, meta: dict) -> list[str]:
    return _write(path, data, meta)


def write_image(path: str | os.PathLike, data, meta: dict) -> list[str]:
    return _write(path, data, meta)


def _write(path, data, meta: dict) -> list[str]:
    volume = volume_from_data(
        data, meta.get("metadata"), meta.get("scale"), meta.get("translate"), name=repr(meta.get("name", "the layer"))
    )
    return [str(write_volume(volume, path))]
