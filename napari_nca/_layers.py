"""Moving volumes between the engine and napari layers without losing where they lie in the patient, and
keeping a scan's results together under short names.

napari places a layer with ``scale`` and ``translate`` only; a scan's full geometry (its affine, including
the axis directions, and its NIfTI header) travels in ``layer.metadata["mednca_volume"]``, so a
segmentation computed from a layer, or saved from it, gets the exact geometry of the scan it came from.
Layers without that metadata (made by other plugins or by hand) fall back to their scale and translate.

Every layer placed by ``layer_kwargs`` is in millimetres and names its axes by anatomy ("axial I→S": the
slider moves through axial slices from inferior to superior), read from the scan's orientation.
Results are named ``<scan>_<what>`` (as the command line names its files), inserted just above the scan's
other layers, and never written into an existing Labels layer: a re-run gets ``<scan>_seg_2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mednca.errors import VolumeError
from mednca.orientation import PLANES, axis_codes
from mednca.volume import Volume

VOLUME_KEY = "mednca_volume"
RESULT_KEY = "mednca_result"  # what made a result layer: {"kind", "scan", "model", "settings", ...}
ORIGINAL_KEY = "mednca_original"  # the labels as the engine gave them, to tell which slices a user changed
OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def anatomical_axis_labels(affine: np.ndarray) -> tuple[str, ...]:
    """Per array axis, the plane its slices lie in and the direction its index runs ("axial I→S")."""
    return tuple(f"{PLANES[code]} {OPPOSITE[code]}→{code}" for code in axis_codes(affine))


def layer_kwargs(volume: Volume, leading: Sequence[str] = ()) -> dict:
    """Keyword arguments placing a layer on ``volume``'s grid: voxel spacing as scale (in mm), origin as
    translate, anatomical axis labels, the volume itself (not a copy) in the metadata. ``leading`` names
    extra axes that come first (the growth's "NCA step"), with unit scale."""
    lead = len(leading)
    return {
        "scale": (1.0,) * lead + tuple(float(s) for s in volume.spacing),
        "translate": (0.0,) * lead + tuple(float(t) for t in volume.origin),
        "units": ("dimensionless",) * lead + ("mm",) * 3,
        "axis_labels": (*leading, *anatomical_axis_labels(volume.affine)),
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


def is_result(layer) -> bool:
    """True for layers napari-nca computed (their metadata holds a "mednca_" key other than the volume)."""
    return any(key.startswith("mednca_") and key != VOLUME_KEY for key in layer.metadata)


def scan_layers(viewer) -> list[tuple[str, object]]:
    """(name, layer) of the viewer's layers a model can segment: 3D single-channel images, without the maps
    napari-nca computed."""
    from napari.layers import Image

    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb and not is_result(layer)
    ]


def labels_layers_on(viewer, shape: tuple[int, ...]) -> list[tuple[str, object]]:
    """(name, layer) of the Labels layers with ``shape``: those that can hold corrections of a scan."""
    from napari.layers import Labels

    return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Labels) and layer.data.shape == shape]


def results_of(viewer, scan_name: str, kind: str) -> list:
    """The result layers of ``kind`` made from the scan called ``scan_name``, oldest first."""
    return [
        layer for layer in viewer.layers
        if layer.metadata.get(RESULT_KEY, {}).get("kind") == kind
        and layer.metadata[RESULT_KEY].get("scan") == scan_name
    ]


def versioned_name(viewer, base: str) -> str:
    """``base`` when no layer has that name, else ``base_2``, ``base_3``... (a new result never takes the
    name, or the place, of an earlier one)."""
    names = {layer.name for layer in viewer.layers}
    if base not in names:
        return base
    n = 2
    while f"{base}_{n}" in names:
        n += 1
    return f"{base}_{n}"


def add_result(viewer, scan_layer, layer, replaces=None):
    """Add ``layer`` just above ``scan_layer``'s group (the scan and the results made from it), so each
    scan's layers stay together in the layer list. ``replaces``: an earlier layer of the same kind that
    nobody can have edited (an image map) to take the place of."""
    if replaces is not None and replaces in viewer.layers:
        index = viewer.layers.index(replaces)
        viewer.layers.remove(replaces)
        viewer.layers.insert(index, layer)
        return layer
    group = [i for i, other in enumerate(viewer.layers)
             if other is scan_layer or other.metadata.get(RESULT_KEY, {}).get("scan") == scan_layer.name]
    viewer.layers.insert(max(group) + 1 if group else len(viewer.layers), layer)
    return layer


def edited_slices(layer, axis: int) -> list[int] | None:
    """Indices along ``axis`` of the slices where a segmentation layer differs from what the engine gave
    (the slices a user corrected); None for layers without that record (painted from scratch, or opened
    from a file), where every labelled slice counts."""
    original = layer.metadata.get(ORIGINAL_KEY)
    data = np.asarray(layer.data)
    if original is None or original.shape != data.shape:
        return None
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero((data != original).any(axis=other)).tolist()


def slice_world_position(volume: Volume, axis: int, index: int) -> float:
    """World coordinate napari uses for slice ``index`` along ``axis`` of a layer made by ``layer_kwargs``."""
    return float(volume.origin[axis] + index * volume.spacing[axis])


def current_index(viewer, layer, axis: int) -> int:
    """Index along ``axis`` of the 3D ``layer`` that the viewer shows now."""
    point = np.asarray(viewer.dims.point)[-3:]
    index = round((point[axis] - layer.translate[-3:][axis]) / layer.scale[-3:][axis])
    return int(np.clip(index, 0, layer.data.shape[-3:][axis] - 1))


def show_slices_along(viewer, axis: int) -> None:
    """Make the 2D view display the two other axes of the volume, so the dims slider moves along ``axis``,
    keeping any leading axes (a growth step) as sliders too. Nothing moves when the view already does."""
    ndim = viewer.dims.ndim
    if ndim < 3 or viewer.dims.ndisplay != 2:  # a 3D view shows every axis already
        return
    world = ndim - 3 + axis
    shown = [ndim - 3 + a for a in range(3) if a != axis]
    if list(viewer.dims.displayed) == shown:
        return
    rest = [d for d in range(ndim) if d not in shown and d != world]
    viewer.dims.order = tuple(rest + [world] + shown)


def go_to_slice(viewer, volume: Volume, axis: int, index: int) -> None:
    """Show slice ``index`` along ``axis`` of ``volume``'s grid."""
    show_slices_along(viewer, axis)
    viewer.dims.set_point(viewer.dims.ndim - 3 + axis, slice_world_position(volume, axis, index))
