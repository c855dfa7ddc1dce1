"""Model files: our own ``.safetensors`` format, and import of the Med-NCA authors' checkpoints.

A model file is one ``.safetensors`` file: the weights, plus JSON metadata under the key ``mednca`` with
the architecture, the preprocessing, the class names and the provenance, and a SHA-256 over the weights and
that metadata together (format 2), so a file damaged or edited after saving is refused. The digest is not a
signature: anyone can recompute it. The metadata is checked against ``model_schema`` before anything is
built from it. safetensors never unpickles, so loading a foreign file cannot run code. The authors' ``.pth``
files are read with ``torch.load(weights_only=True)`` for the same reason.

Format 1 files (before the digest covered the metadata) still load: their weights are checked, their
metadata only against the schema, with a warning. Refusing them would lock users out of the models they
fine-tuned, and an edit the format 1 digest misses is one that anyone could also hide from a format 2 digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .model import MedNCA, NCAConfig
from .model_schema import SchemaError, check_metadata, reference_settings, shown
from .preprocess import Preprocessing
from .staging import staged_file

FORMAT = "mednca"
FORMAT_VERSION = 2  # 1: the digest covered the weights only; 2: the weights and the metadata


class UnprotectedMetadataWarning(UserWarning):
    """A format 1 model file is loading: its metadata was not covered by its digest."""


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensor names, shapes, dtypes and bytes, in name order (the whole digest of format 1)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 over the weights' digest and the canonical JSON of the metadata without its ``sha256`` field
    (sorted keys, fixed separators, ASCII): the digest of format 2."""
    described = {k: v for k, v in meta.items() if k != "sha256"}
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{weights_digest(tensors)}\n{canonical}".encode()).hexdigest()


def save_model(model: MedNCA, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``) atomically: a crash never leaves half a file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"model files end in .safetensors, not {path.name!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.config.to_dict(),
        "preprocessing": model.preprocessing.to_dict(),
        "provenance": model.provenance,
    }
    meta = json.loads(json.dumps(meta))  # digest what a reader will parse (tuples read back as lists)
    meta["sha256"] = model_digest(tensors, meta)
    _check_schema(meta, path.name)  # never write a file that would not load
    with staged_file(path) as tmp:
        save_file(tensors, tmp, metadata={FORMAT: json.dumps(meta)})
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a model file, verified and checked as ``load_model_file`` does, without building the
    model (for listings: reading the weights of a 70,000-parameter model costs milliseconds)."""
    return _read_verified(_existing(path))[0]


def load_model_file(path: str | os.PathLike) -> MedNCA:
    """Load a ``.safetensors`` model, checking its digest, its metadata against the schema and its weights
    against its architecture."""
    path = _existing(path)
    meta, tensors = _read_verified(path)
    if meta["format_version"] < 2:
        warnings.warn(
            f"{path.name} is a format 1 model file: its weights are verified but its metadata (classes, "
            "preprocessing, steps) is not; save it again with this napari-nca to protect it",
            UnprotectedMetadataWarning,
            stacklevel=2,
        )
    try:
        config = NCAConfig.from_dict(meta["architecture"])
        prep = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: invalid model description ({e})") from None
    return _build(config, prep, meta["provenance"], tensors, path.name)


def _read_verified(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a model file, in one opening, after checking the digest (of the weights
    and metadata; of the weights only in format 1) and then the metadata against the schema."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _parse_metadata((f.metadata() or {}).get(FORMAT), path.name)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a readable .safetensors model file ({e})") from None
    digest = model_digest(tensors, meta) if meta["format_version"] >= 2 else weights_digest(tensors)
    if digest != meta.get("sha256"):
        what = "weights and metadata" if meta["format_version"] >= 2 else "weights"
        raise CheckpointError(f"{path.name}: the {what} do not match their checksum; the file was altered or damaged")
    _check_schema(meta, path.name)
    return meta, tensors


def _check_schema(meta: dict, name: str) -> None:
    try:
        check_metadata(meta)
    except SchemaError as e:
        raise CheckpointError(f"{name}: {e}") from None


def _parse_metadata(raw: str | None, name: str) -> dict:
    if raw is None:
        raise CheckpointError(f"{name} is a safetensors file but not a Med-NCA model (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{name}: the model metadata is damaged ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a Med-NCA model file")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{name}: format_version must be an integer from 1, got {shown(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{name} was written by a newer napari-nca (format {version}); please upgrade")
    return meta


def import_reference(directory: str | os.PathLike) -> MedNCA:
    """Convert the Med-NCA authors' checkpoint folder (``model0.pth``, ``model1.pth``, ``config.dt``).

    The authors keep the state channels-last and convolve it after ``transpose(1, 3)``, i.e. on
    ``[B, C, W, H]``; our channels-first state needs the 3x3 kernels transposed to match.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder holding model0.pth, model1.pth and config.dt")
    cfg = _read_reference_config(directory / "config.dt")
    try:
        ref = reference_settings(cfg)
    except SchemaError as e:
        raise CheckpointError(f"config.dt: {e}") from None
    sizes = [tuple(s) for s in ref["input_size"]]
    levels = len(sizes)
    channels, hidden = ref["channel_n"], ref["hidden_size"]
    config = NCAConfig(
        channels=channels,
        hidden=hidden,
        input_channels=ref["input_channels"],
        output_channels=ref["output_channels"],
        levels=levels,
        steps=(ref["inference_steps"],) * levels,
        fire_rate=float(ref["cell_fire_rate"]),
        downscale=sizes[1][0] // sizes[0][0] if levels > 1 else NCAConfig.downscale,  # unused with one level
        input_size=sizes[-1],
        class_names=("hippocampus",),
    )
    expected = _reference_shapes(channels, hidden)
    state = {}
    for level in range(levels):
        f = directory / f"model{level}.pth"
        if not f.is_file():
            raise CheckpointError(f"{directory} has no {f.name}: expected one file per level (model0.pth, ...)")
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged or pickled-code files
            raise CheckpointError(f"{f.name} is not a plain PyTorch weights file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or set(sd) != set(expected):
            got = sorted(map(str, sd)) if isinstance(sd, dict) else type(sd).__name__
            raise CheckpointError(f"{f.name} is not a Med-NCA backbone: expected keys {sorted(expected)}, got {got}")
        for key, shape in expected.items():
            t = sd[key]
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(
                    f"{f.name}: {key} is {got}, but config.dt (channel_n {channels}, hidden_size {hidden}) "
                    f"needs a float tensor of shape {shape}"
                )
        p = f"backbones.{level}."
        state[p + "perceive.weight"] = torch.cat(
            [sd["p0.weight"].transpose(-1, -2), sd["p1.weight"].transpose(-1, -2)], 0
        )
        state[p + "perceive.bias"] = torch.cat([sd["p0.bias"], sd["p1.bias"]], 0)
        state[p + "fc0.weight"] = sd["fc0.weight"][:, :, None, None]
        state[p + "fc0.bias"] = sd["fc0.bias"]
        state[p + "fc1.weight"] = sd["fc1.weight"][:, :, None, None]
    prep = Preprocessing(axis=2, resize="bicubic", percentiles=(0.5, 99.5), scope="slice")
    provenance = {
        "source": "Med-NCA authors' pretrained hippocampus model (MECLabTUDA/M3D-NCA), imported",
        "licence": "MIT",
        "imported_from": str(directory.resolve()),
        "reference_config": cfg,
        "citation": "Kalkhof, Gonzalez, Mukhopadhyay. Med-NCA. IPMI 2023",
    }
    return _build(config, prep, provenance, {k: v.float() for k, v in state.items()}, directory.name)


def _reference_shapes(channels: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The authors' backbone tensors: two 3x3 perception convolutions and two dense layers."""
    return {
        "p0.weight": (channels, channels, 3, 3),
        "p0.bias": (channels,),
        "p1.weight": (channels, channels, 3, 3),
        "p1.bias": (channels,),
        "fc0.weight": (hidden, 3 * channels),
        "fc0.bias": (hidden,),
        "fc1.weight": (channels, hidden),
    }


def _read_reference_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no config.dt (the authors' JSON config)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name} is not the authors' JSON config ({e})") from None
    if isinstance(cfg, list) and cfg and isinstance(cfg[0], dict):
        cfg = cfg[0]
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path.name} does not hold a config object")
    return cfg


def _build(config: NCAConfig, prep: Preprocessing, provenance: dict, tensors: dict[str, torch.Tensor],
           name: str) -> MedNCA:
    """The model, once ``tensors`` are known to fit ``config``: the fit is checked against a model on the
    meta device, so a description that claims a huge architecture allocates nothing."""
    with torch.device("meta"):
        expected = MedNCA(config).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: weights do not fit the architecture (missing {missing}, unexpected {unexpected})"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{name}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{name}: {k} holds NaN or infinite values")
    model = MedNCA(config, preprocessing=prep, provenance=provenance)
    model.load_state_dict(tensors)
    return model.eval()


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file")
    return path
