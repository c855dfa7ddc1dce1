"""Med-NCA: neural cellular automata for medical image segmentation (Kalkhof et al., IPMI 2023).

The engine behind the napari-nca plugin, usable from scripts and the ``mednca`` command line::

    import mednca
    model = mednca.load_model("hippocampus")
    volume = mednca.read_volume("scan.nii.gz")
    result = mednca.segment(model, volume)
    mednca.write_volume(result.labels, "scan_seg.nii.gz")
"""

from .checkpoint import import_reference, load_model_file, save_model
from .errors import CheckpointError, MedNCAError, VolumeError
from .evaluation import evaluate
from .finetuning import finetune
from .inference import quality_map, record_growth, segment
from .model import MedNCA, NCAConfig
from .preprocess import Preprocessing
from .registry import list_models, load_model, save_user_model
from .training import train
from .volume import Volume, check_labels, image_array, read_volume, write_volume

__all__ = [
    "CheckpointError",
    "MedNCA",
    "MedNCAError",
    "NCAConfig",
    "Preprocessing",
    "Volume",
    "VolumeError",
    "check_labels",
    "evaluate",
    "finetune",
    "image_array",
    "import_reference",
    "list_models",
    "load_model",
    "load_model_file",
    "quality_map",
    "read_volume",
    "record_growth",
    "save_model",
    "save_user_model",
    "segment",
    "train",
    "write_volume",
]
__version__ = "0.1.0"
