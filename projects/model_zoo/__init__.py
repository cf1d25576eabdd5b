"""d2seg's model zoo: config lookup, a table of named checkpoints (URL + sha256 + the
converter they need), checked downloads (``MODEL.WEIGHTS d2seg://<name>`` or an URL), and
one front door for converting foreign checkpoints (AdelaiDet, hustvl/SparseInst,
Detectron2's PointRend). See docs/model_zoo.md.
"""
from .configs import configs_root, get, get_config, get_config_file, list_configs
from .converters import (
    CheckpointMismatchError, ConversionResult, Converter, compare_with_model, convert_state_dict,
    detect_format, get_converter, list_converters, register_converter,
)
from .download import (
    ChecksumMismatchError, DownloadError, UnverifiedDownloadError, cache_dir, fetch, resolve_weights,
)
from .loading import UnsafeCheckpointError, load_checkpoint_file
from .registry import CHECKPOINTS, CheckpointEntry, get_checkpoint, register_checkpoint, unregister_checkpoint

__all__ = [
    "configs_root", "get", "get_config", "get_config_file", "list_configs",
    "CheckpointMismatchError", "ConversionResult", "Converter", "compare_with_model",
    "convert_state_dict", "detect_format", "get_converter", "list_converters", "register_converter",
    "ChecksumMismatchError", "DownloadError", "UnverifiedDownloadError", "cache_dir", "fetch",
    "resolve_weights", "UnsafeCheckpointError", "load_checkpoint_file",
    "CHECKPOINTS", "CheckpointEntry", "get_checkpoint", "register_checkpoint", "unregister_checkpoint",
]
