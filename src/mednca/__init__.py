"""Med-NCA: neural cellular automata for medical image segmentation (Kalkhof et al., IPMI 2023)."""

from .checkpoint import import_reference, load_model_file, save_model
from .errors import CheckpointError, MedNCAError, VolumeError
from .model import MedNCA, NCAConfig
from .preprocess import Preprocessing

__all__ = [
    "CheckpointError",
    "MedNCA",
    "MedNCAError",
    "NCAConfig",
    "Preprocessing",
    "VolumeError",
    "import_reference",
    "load_model_file",
    "save_model",
]
__version__ = "0.1.0"
