"""d2seg's model zoo: config lookup, a table of named checkpoints (mirrors + sha256 + the
converter they need), checked, resumable downloads (``MODEL.WEIGHTS d2seg://<name>`` or an
URL), safe loading of ``.pth`` and Detectron2 ``.pkl`` files, and one front door for
converting foreign checkpoints (AdelaiDet, hustvl/SparseInst, Detectron2's PointRend).
``python -m d2seg.model_zoo list`` / ``download NAME...``. See docs/model_zoo.md.

Modules, each importing only those before it: ``download`` (URLs and files), ``registry``
(the table), ``weights`` (``MODEL.WEIGHTS`` resolution and the ``d2seg://`` handler of
Detectron2's PathManager, registered on import of this package), ``loading``, ``converters``,
``configs``, ``cli``.
"""
from .configs import configs_root, get, get_config, get_config_file, list_configs
from .converters import (
    CheckpointMismatchError, ConversionResult, Converter, compare_with_model, convert_state_dict,
    detect_format, get_converter, list_converters, register_converter,
)
from .download import ChecksumMismatchError, DownloadError, UnverifiedDownloadError, cache_dir, fetch
from .loading import UnsafeCheckpointError, load_checkpoint_file, load_pickle_restricted
from .registry import (
    CHECKPOINTS, LOCAL_CHECKPOINTS, CheckpointEntry, get_checkpoint, register_checkpoint, unregister_checkpoint,
)
from .weights import register_handler, resolve_weights

register_handler()

__all__ = [
    "configs_root", "get", "get_config", "get_config_file", "list_configs",
    "CheckpointMismatchError", "ConversionResult", "Converter", "compare_with_model",
    "convert_state_dict", "detect_format", "get_converter", "list_converters", "register_converter",
    "ChecksumMismatchError", "DownloadError", "UnverifiedDownloadError", "cache_dir", "fetch",
    "resolve_weights", "UnsafeCheckpointError", "load_checkpoint_file", "load_pickle_restricted",
    "CHECKPOINTS", "LOCAL_CHECKPOINTS", "CheckpointEntry", "get_checkpoint", "register_checkpoint",
    "unregister_checkpoint",
]
