"""Moving volumes between the engine and napari layers without losing where they lie in the patient.

napari places a layer with ``scale`` and ``translate`` only; a scan's full geometry (its affine, including
the axis directions, and its NIfTI header) travels in ``layer.metadata["mednca_volume"]``, so a
segmentation computed from a layer, or saved from it, gets the exact geometry of the scan it came from.
Layers without that metadata (made by other plugins or by hand) fall back to their scale and translate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mednca.errors import VolumeError
from mednca.volume import Volume

VOLUME_KEY = "mednca_volume"


def layer_kwargs(volume: Volume, leading: int = 0) -> dict:
    """Keyword arguments placing a layer on ``volume``'s grid: voxel spacing as scale, origin as translate,
    the volume itself (not a copy) in the metadata. ``leading`` extra axes (a growth step axis) come first
    with unit scale."""
    return {
        "scale": (1.0,) * leading + tuple(float(s) for s in volume.spacing),
        "translate": (0.0,) * leading + tuple(float(t) for t in volume.origin),
        "metadata": {VOLUME_KEY: volume},
    }


def volume_from_data(
    data, metadata: Mapping | None, scale: Sequence[float] | None = None, translate: Sequence[float] | None = None,
    name: str = "the layer",
) -> Volume:
    """A ``Volume`` holding ``data`` with the geometry the layer carries (see the module docstring)."""
    if isinstance(data, list | tuple):
        raise VolumeError(f"{name} is a multiscale layer; napari-nca works on single-resolution 3D volumes")
    array = np.asarray(data)
    if array.ndim != 3:
        raise VolumeError(f"{name} has {array.ndim} dimensions (shape {array.shape}); a 3D volume is needed")
    known = (metadata or {}).get(VOLUME_KEY)
    if isinstance(known, Volume) and known.shape == array.shape:
        return known if known.array is array else known.like(array)
    affine = np.eye(4)
    if scale is not None:
        affine[:3, :3] = np.diag(np.asarray(scale, dtype=np.float64)[-3:])
    if translate is not None:
        affine[:3, 3] = np.asarray(translate, dtype=np.float64)[-3:]
    return Volume(array, affine)


def volume_from_layer(layer) -> Volume:
    """The ``Volume`` a 3D napari Image or Labels layer shows."""
    if getattr(layer, "rgb", False):
        raise VolumeError(f"{layer.name!r} is an RGB image; a single-channel 3D scan is needed")
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = list(data)
    return volume_from_data(data, layer.metadata, layer.scale, layer.translate, name=repr(layer.name))


def scan_layers(viewer) -> list[tuple[str, object]]:
    """(name, layer) of the viewer's layers a model can segment: 3D single-channel images, without the maps
    napari-nca computed (their metadata holds a key starting with "mednca_" other than the volume)."""
    from napari.layers import Image

    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb
        and not any(key.startswith("mednca_") and key != VOLUME_KEY for key in layer.metadata)
    ]


def slice_world_position(volume: Volume, axis: int, index: int) -> float:
    """World coordinate napari uses for slice ``index`` along ``axis`` of a layer made by ``layer_kwargs``."""
    return float(volume.origin[axis] + index * volume.spacing[axis])


def show_slices_along(viewer, axis: int) -> None:
    """Make the 2D view display the two other axes of the volume, so the dims slider moves along ``axis``
    (the model's slice axis), keeping any leading axes (a growth step) as sliders too."""
    ndim = viewer.dims.ndim
    if ndim < 3:
        return
    world = ndim - 3 + axis
    shown = [ndim - 3 + a for a in range(3) if a != axis]
    rest = [d for d in range(ndim) if d not in shown and d != world]
    viewer.dims.order = tuple(rest + [world] + shown)
