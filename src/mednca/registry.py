"""Finding models by name: the ones shipped inside the package, and the user's own folder.

Shipped models live in ``mednca/models/``; fine-tuned and imported models are saved to the user's data
folder (platformdirs; ``MEDNCA_MODELS_DIR`` overrides it), where the viewer and the command line list them.
A name, a ``.safetensors`` path or the authors' checkpoint folder all load through ``load_model``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .checkpoint import import_reference, load_model_file, read_metadata, save_model
from .errors import CheckpointError
from .model import MedNCA
from .model_schema import printable

SHIPPED_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "hippocampus"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # "shipped" or "user"
    metadata: dict

    @property
    def summary(self) -> str:
        """One line for listings and tooltips. Text from the file (its name, provenance) is shown through
        ``printable``, so a file cannot print fake lines or terminal escapes; class names are printable already."""
        arch = self.metadata.get("architecture", {})
        prov = self.metadata.get("provenance", {})
        classes = ", ".join(arch.get("class_names", []))
        origin = prov.get("source") or prov.get("finetuned_from") or ""
        text = f"{self.name} [{self.source}] classes: {classes}; {origin}".strip()
        held_out = prov.get("validation_dice_native", {})
        whole = held_out.get("whole") if isinstance(held_out, dict) else None
        if isinstance(whole, (int, float)) and not isinstance(whole, bool):
            text += f"; whole Dice {whole:.3f} on {held_out.get('cases', '?')} held-out cases"
        context = self.metadata.get("preprocessing", {}).get("context", 0)  # an integer: the schema checked it
        if context:
            text += f"; reads {context} neighbouring slice{'s' if context > 1 else ''} on each side"
        return printable(text)


def user_models_dir() -> Path:
    env = os.environ.get("MEDNCA_MODELS_DIR")
    return Path(env) if env else Path(platformdirs.user_data_dir("napari-nca")) / "models"


def list_models() -> list[ModelEntry]:
    """Shipped models first, then the user's, by name. Unreadable files in the user folder are skipped."""
    entries = []
    for source, folder in (("shipped", SHIPPED_DIR), ("user", user_models_dir())):
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                entries.append(ModelEntry(path.stem, path, source, read_metadata(path)))
            except CheckpointError:
                continue
    return entries


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The file or folder a model name or path refers to."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _NAME.match(text):
        for folder in (user_models_dir(), SHIPPED_DIR):
            candidate = folder / f"{text}.safetensors"
            if candidate.is_file():
                return candidate
    known = ", ".join(e.name for e in list_models()) or "none"
    raise CheckpointError(f"no model named or found at {text!r} (known models: {known})")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> MedNCA:
    """Load a shipped or user model by name, a ``.safetensors`` file, or the authors' checkpoint folder."""
    path = resolve(name_or_path)
    if path.is_dir():
        return import_reference(path)
    return load_model_file(path)


def save_user_model(model: MedNCA, name: str) -> Path:
    """Save ``model`` into the user's model folder as ``name`` (never over a shipped model)."""
    if not _NAME.match(name):
        raise CheckpointError(f"model names use letters, digits, '_', '-' and '.', got {name!r}")
    if (SHIPPED_DIR / f"{name}.safetensors").exists():
        raise CheckpointError(f"{name!r} is a shipped model; choose another name")
    return save_model(model, user_models_dir() / f"{name}.safetensors")
