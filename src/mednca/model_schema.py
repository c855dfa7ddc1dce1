"""What a model description may say: the types and ranges of a model file's metadata and of the Med-NCA
authors' ``config.dt``, checked before anything is built from them.

A model file comes from outside, and its digest (see ``checkpoint``) only shows it is unchanged since someone
saved it. A description with absurd values must give one line naming the field at fault, never a traceback
from deep inside torch or an allocation of gigabytes. The bounds are generous for a 2D Med-NCA on a laptop
CPU (the shipped models use 32 channels, 128 hidden units, 16 steps per level, 64x64 slices) but stop absurd
values.

Text a model file carries is shown to the user (class names in layer names and listings, provenance in
summaries): class names must be printable here, and other text goes through ``printable`` before it is shown,
so a file cannot print fake lines or terminal escape sequences.
"""

from __future__ import annotations

import math
import re

from .errors import MedNCAError
from .preprocess import MAX_CONTEXT, RESIZE_MODES, SCOPES, is_axis_codes

MAX_CHANNELS = 1024
MAX_HIDDEN = 4096
MAX_LEVELS = 8
MAX_DOWNSCALE = 16
MAX_STEPS = 1000
MIN_SIZE, MAX_SIZE = 4, 1024
MAX_CLASSES = 255  # labels are written as uint8
MAX_NAME = 64
ARCHITECTURE_FIELDS = ("channels", "hidden", "input_channels", "output_channels", "levels", "steps", "fire_rate",
                       "downscale", "input_size", "class_names")
PREPROCESSING_FIELDS = ("axis", "resize", "percentiles", "scope")
METADATA_FIELDS = ("format", "format_version", "architecture", "preprocessing", "provenance", "sha256")
# The authors' settings that an import reads, with the paper's values for those a config.dt leaves out.
REFERENCE_DEFAULTS = {"channel_n": 32, "hidden_size": 128, "input_channels": 1, "output_channels": 1,
                      "inference_steps": 16, "cell_fire_rate": 0.5, "input_size": [[16, 16], [64, 64]]}
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class SchemaError(MedNCAError, ValueError):
    """A model description that breaks the schema; the message names the field, for one line to the user."""


def printable(text: object) -> str:
    """``text`` with every character that is not printable (control characters, the ESC of terminal escape
    sequences, line breaks, bidirectional overrides) written as its Python escape, e.g. ``\\x1b``."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def is_class_name(name: object) -> bool:
    """A class name is shown in listings and layer names: 1 to 64 printable characters, not all blank."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable() and not name.isspace()


def check_metadata(meta: object) -> None:
    """A model file's metadata (format 1 or 2): its architecture and preprocessing in full, its provenance
    an object, its digest a SHA-256 in hex. ``format`` and ``format_version`` are the reader's to judge."""
    fields = _Fields("metadata", "", meta, METADATA_FIELDS)
    fields.check("provenance", "an object", lambda v: isinstance(v, dict))
    fields.check("sha256", "64 lowercase hex digits", lambda v: isinstance(v, str) and bool(_HEX_DIGEST.match(v)))
    check_architecture(meta["architecture"])
    check_preprocessing(meta["preprocessing"])
    check_inputs(meta["architecture"]["input_channels"], meta["preprocessing"].get("context", 0))


def check_architecture(arch: object) -> None:
    """An architecture (``NCAConfig.to_dict()``): every field present, of its type and in range, and the
    fields consistent with each other."""
    f = _Fields("architecture", "architecture.", arch, ARCHITECTURE_FIELDS)
    channels = f.integer("channels", 2, MAX_CHANNELS)
    f.integer("hidden", 1, MAX_HIDDEN)
    most = min(1 + 2 * MAX_CONTEXT, channels - 1)
    inputs = f.check("input_channels", f"an odd integer from 1 to {most} (the slice and as many neighbouring slices "
                     "on each side, leaving a channel for the output)",
                     lambda v: _is_int(v) and v % 2 == 1 and 1 <= v <= most)
    outputs = f.integer("output_channels", 1, min(MAX_CLASSES, channels - inputs))
    levels = f.integer("levels", 1, MAX_LEVELS)
    f.check("steps", f"a list of {levels} integers from 1 to {MAX_STEPS}, one per level",
            lambda v: _int_list(v, levels, 1, MAX_STEPS))
    f.check("fire_rate", "a number from 0 to below 1", lambda v: _is_number(v) and 0 <= v < 1)
    downscale = f.integer("downscale", 2, MAX_DOWNSCALE)
    f.check("input_size", f"a list of two integers from {MIN_SIZE} to {MAX_SIZE}",
            lambda v: _int_list(v, 2, MIN_SIZE, MAX_SIZE))
    scale = downscale ** (levels - 1)
    f.check("input_size", f"divisible by downscale**(levels - 1) = {scale}", lambda v: all(s % scale == 0 for s in v))
    f.check("input_size", f"at least {2 * scale} (2 pixels at the coarsest of {levels} levels)",
            lambda v: min(v) >= 2 * scale)
    f.check("class_names", f"a list of {outputs} distinct names (one per output channel) of 1 to {MAX_NAME} "
            "printable characters", lambda v: _names(v, outputs))


def check_preprocessing(prep: object) -> None:
    """A preprocessing (``Preprocessing.to_dict()``); ``orientation`` may be absent (files written before it
    existed mean "RAS"), and so may ``context`` (absent: the slice alone)."""
    f = _Fields("preprocessing", "preprocessing.", prep, PREPROCESSING_FIELDS, optional=("orientation", "context"))
    f.check("axis", "0, 1 or 2", lambda v: _is_int(v) and v in (0, 1, 2))
    f.check("resize", f"one of {', '.join(RESIZE_MODES)}", lambda v: isinstance(v, str) and v in RESIZE_MODES)
    f.check("percentiles", "two numbers, 0 <= low < high <= 100",
            lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) and 0 <= v[0] < v[1] <= 100)
    f.check("scope", f"one of {', '.join(SCOPES)}", lambda v: isinstance(v, str) and v in SCOPES)
    if "orientation" in prep:
        f.check("orientation", "three axis codes, one of each pair L/R, A/P, S/I (e.g. 'RAS')", is_axis_codes)
    if "context" in prep:
        f.integer("context", 0, MAX_CONTEXT)


def check_inputs(input_channels: int, context: int) -> None:
    """A model reads the slice and ``context`` neighbours on each side, so its architecture has
    1 + 2 x ``context`` input channels; anything else would feed its weights the wrong images."""
    if input_channels != 1 + 2 * context:
        raise SchemaError(f"architecture.input_channels is {input_channels}, but preprocessing.context {context} "
                          f"(neighbouring slices on each side) gives {1 + 2 * context} input channels")


def reference_settings(cfg: dict) -> dict:
    """The settings an import of the authors' hippocampus model reads from their ``config.dt``, defaults
    filled in and checked. Their other keys (paths, training settings) are not used and not checked."""
    settings = {**REFERENCE_DEFAULTS, **{k: cfg[k] for k in REFERENCE_DEFAULTS if k in cfg}}
    f = _Fields("config.dt", "", settings, tuple(REFERENCE_DEFAULTS))
    f.integer("channel_n", 2, MAX_CHANNELS)
    f.integer("hidden_size", 1, MAX_HIDDEN)
    f.check("input_channels", "1 (the authors' model reads one MRI channel)", lambda v: _is_int(v) and v == 1)
    f.check("output_channels", "1 (the authors' hippocampus model segments one class)",
            lambda v: _is_int(v) and v == 1)
    f.integer("inference_steps", 1, MAX_STEPS)
    f.check("cell_fire_rate", "a number from 0 to below 1", lambda v: _is_number(v) and 0 <= v < 1)
    f.check("input_size", f"a list of 1 to {MAX_LEVELS} [height, width] pairs of integers from {MIN_SIZE} to "
            f"{MAX_SIZE}, each level the previous one times the same factor of 2 to {MAX_DOWNSCALE}",
            _pyramid)
    return settings


class _Fields:
    """One JSON object of a description, checked field by field: the first bad field raises, naming itself."""

    def __init__(self, what: str, prefix: str, obj: object, required: tuple[str, ...], optional=()):
        if not isinstance(obj, dict):
            raise SchemaError(f"{what} must be an object, got {shown(obj)}")
        unknown = sorted(printable(k) for k in set(obj) - set(required) - set(optional))
        if unknown:
            raise SchemaError(f"{what} has unknown fields: {', '.join(unknown)}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise SchemaError(f"{what} lacks {', '.join(missing)}")
        self.prefix, self.obj = prefix, obj

    def check(self, field: str, rule: str, ok) -> object:
        value = self.obj[field]
        if not ok(value):
            raise SchemaError(f"{self.prefix}{field} must be {rule}, got {shown(value)}")
        return value

    def integer(self, field: str, low: int, high: int) -> int:
        return self.check(field, f"an integer from {low} to {high}", lambda v: _is_int(v) and low <= v <= high)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _int_list(v: object, length: int, low: int, high: int) -> bool:
    return isinstance(v, list) and len(v) == length and all(_is_int(x) and low <= x <= high for x in v)


def _names(v: object, count: int) -> bool:
    return isinstance(v, list) and len(v) == count and all(map(is_class_name, v)) and len(set(v)) == count


def _pyramid(v: object) -> bool:
    """``input_size`` of config.dt: one [height, width] per level, coarsest first, a constant integer factor apart."""
    if not (isinstance(v, list) and 1 <= len(v) <= MAX_LEVELS and all(_int_list(s, 2, MIN_SIZE, MAX_SIZE) for s in v)):
        return False
    factor = v[1][0] // v[0][0] if len(v) > 1 else 2
    return 2 <= factor <= MAX_DOWNSCALE and all(
        [a * factor for a in small] == large for small, large in zip(v, v[1:], strict=False)
    )


def shown(value: object) -> str:
    """A bad value as an error shows it: its repr with anything unprintable escaped, cut short."""
    text = printable(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."
