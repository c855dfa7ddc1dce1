"""Model files: our own ``.safetensors`` format, and import of the Med-NCA authors' checkpoints.

A model file is one ``.safetensors`` file: the weights, plus JSON metadata under the key ``mednca`` with
the architecture, the preprocessing, the class names and the provenance, and a SHA-256 of the weights so a
file altered after saving is refused. safetensors never unpickles, so loading a foreign file cannot run code.
The authors' ``.pth`` files are read with ``torch.load(weights_only=True)`` for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .model import MedNCA, NCAConfig
from .preprocess import Preprocessing

FORMAT = "mednca"
FORMAT_VERSION = 1
REFERENCE_KEYS = {
    "p0.weight": (32, 32, 3, 3),
    "p0.bias": (32,),
    "p1.weight": (32, 32, 3, 3),
    "p1.bias": (32,),
    "fc0.weight": (128, 96),
    "fc0.bias": (128,),
    "fc1.weight": (32, 128),
}


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensor names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
        "sha256": weights_digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={FORMAT: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a model file, without loading its weights (for listings)."""
    return _read(_existing(path), weights=False)[0]


def load_model_file(path: str | os.PathLike) -> MedNCA:
    """Load a ``.safetensors`` model, checking its architecture, weights and checksum."""
    path = _existing(path)
    meta, tensors = _read(path, weights=True)
    if weights_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path.name}: the weights do not match their checksum; the file was altered or damaged")
    try:
        config = NCAConfig.from_dict(meta["architecture"])
        prep = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: invalid model description ({e})") from None
    model = MedNCA(config, preprocessing=prep, provenance=meta.get("provenance", {}))
    _load_state(model, tensors, path.name)
    return model.eval()


def _read(path: Path, weights: bool) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The checked metadata of a model file and, with ``weights``, its tensors, in one opening."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FORMAT)
            meta = _parse_metadata(raw, path.name)
            tensors = {k: f.get_tensor(k) for k in f.keys()} if weights else None  # noqa: SIM118
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a readable .safetensors model file ({e})") from None
    return meta, tensors


def _parse_metadata(raw: str | None, name: str) -> dict:
    if raw is None:
        raise CheckpointError(f"{name} is a safetensors file but not a Med-NCA model (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{name}: the model metadata is damaged ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{name} is not a Med-NCA model file")
    if meta["format_version"] > FORMAT_VERSION:
        version = meta["format_version"]
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
    levels = len(cfg.get("input_size", [[16, 16], [64, 64]]))
    sizes = [tuple(s) for s in cfg.get("input_size", [[16, 16], [64, 64]])]
    downscale = sizes[-1][0] // sizes[0][0] if levels > 1 else 1
    config = NCAConfig(
        channels=int(cfg.get("channel_n", 32)),
        hidden=int(cfg.get("hidden_size", 128)),
        input_channels=int(cfg.get("input_channels", 1)),
        output_channels=int(cfg.get("output_channels", 1)),
        levels=levels,
        steps=(int(cfg.get("inference_steps", 16)),) * levels,
        fire_rate=float(cfg.get("cell_fire_rate", 0.5)),
        downscale=downscale,
        input_size=sizes[-1],
        class_names=("hippocampus",) if int(cfg.get("output_channels", 1)) == 1 else tuple(
            f"class {i + 1}" for i in range(int(cfg.get("output_channels", 1)))
        ),
    )
    state = {}
    for level in range(levels):
        f = directory / f"model{level}.pth"
        if not f.is_file():
            raise CheckpointError(f"{directory} has no {f.name}: expected one file per level (model0.pth, ...)")
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged or pickled-code files
            raise CheckpointError(f"{f.name} is not a plain PyTorch weights file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or set(sd) != set(REFERENCE_KEYS):
            got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise CheckpointError(
                f"{f.name} is not a Med-NCA backbone: expected keys {sorted(REFERENCE_KEYS)}, got {got}"
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
    model = MedNCA(config, preprocessing=prep, provenance=provenance)
    _load_state(model, {k: v.float() for k, v in state.items()}, directory.name)
    return model.eval()


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


def _load_state(model: MedNCA, tensors: dict[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
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
    model.load_state_dict(tensors)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file")
    return path
