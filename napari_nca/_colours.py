"""One colour per class everywhere the plugin shows a class, and the colours of napari's dark theme.

A clinician reading "orange is anterior" in the legend must find orange in the segmentation, in its growth
and in the probability maps alike. The class colours are the Okabe-Ito palette (told apart by colour-blind
readers, and bright on a grey MRI); class k of a model is ``CLASS_COLOURS[k - 1]``.
"""

from __future__ import annotations

import html

import numpy as np
from napari.utils.colormaps import Colormap, DirectLabelColormap

CLASS_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#CC79A7", "#D55E00", "#0072B2")
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
GROWTH_OPAQUE = 0.9  # probability at which a voxel of the growth replay is fully coloured

# napari's default dark theme, so plots and notes sit in the dock without a white box
BACKGROUND = "#262930"
FOREGROUND = "#d1d2d4"
# the quality verdict: ok / check / fail
VERDICT_COLOURS = {"ok": "#2e9e4f", "check": "#d99a00", "fail": "#d64541"}


def class_colour(k: int) -> str:
    """Hex colour of class ``k`` (1-based, as in the labels)."""
    return CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]


def class_rgb(k: int) -> np.ndarray:
    """Class ``k``'s colour as three floats in 0..1."""
    value = class_colour(k).lstrip("#")
    return np.array([int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)])


def labels_colormap(n_classes: int) -> DirectLabelColormap:
    """Labels colours: background transparent, class k in its colour; values outside the classes (a user
    painting label 9) get napari's default grey rather than a random colour."""
    colours = {None: (0.5, 0.5, 0.5, 1.0), 0: TRANSPARENT}
    colours.update({k: (*class_rgb(k), 1.0) for k in range(1, n_classes + 1)})
    return DirectLabelColormap(color_dict=colours)


def probability_colormap(k: int) -> Colormap:
    """A probability map of class ``k``: transparent at 0, the class colour at 1."""
    rgb = class_rgb(k)
    return Colormap([[*rgb, 0.0], [*rgb, 1.0]], name=f"napari-nca class {k}", display_name=f"class {k}")


def growth_rgba(probability: np.ndarray) -> np.ndarray:
    """``[K, ...]`` probabilities -> ``[..., 4]`` uint8 colours for the growth replay: each voxel in the colour
    of its most probable class, transparent until the structure (the classes' summed probability) passes
    even odds (0.5, where a voxel starts to be labelled) and opaque from ``GROWTH_OPAQUE`` on. The coarse
    level hovers around even odds everywhere; shown as raw probability it is a colour wash, shown this way
    the structure emerges from it."""
    best = probability.argmax(0)
    palette = np.array([class_rgb(k + 1) for k in range(probability.shape[0])]) * 255
    rgba = np.empty((*best.shape, 4), np.uint8)
    rgba[..., :3] = palette[best]
    rgba[..., 3] = np.clip((probability.sum(0) - 0.5) / (GROWTH_OPAQUE - 0.5), 0, 1) * 255
    return rgba


def legend_html(class_names) -> str:
    """Rich text naming each class next to a square of its colour."""
    items = [
        f'<span style="color:{class_colour(k)}">&#9632;</span>&nbsp;{html.escape(name)}'
        for k, name in enumerate(class_names, start=1)
    ]
    return "&nbsp;&nbsp; ".join(items)
