"""Reading checkpoint files without running code from them.

- ``.pkl`` (Detectron2's and Caffe2's model-zoo format, e.g. Detectron2's PointRend
  checkpoints and the ``ImageNetPretrained/MSRA/R-50.pkl`` backbones): a plain pickle of
  numpy arrays in dicts. It is read by :class:`RestrictedUnpickler`, which builds numpy
  arrays, numpy scalars and dtypes and plain containers only, and refuses any other global
  (so a ``__reduce__`` payload never runs) with :class:`UnsafeCheckpointError` naming the
  file and the refused global. No opt-in is needed.
- ``.pth`` (and anything else): ``torch.load(weights_only=True)``, which unpickles tensors,
  numbers, strings and containers only.

A file that needs more (custom classes) is read only with the explicit opt-in
``allow_pickle=True`` or ``D2SEG_ALLOW_PICKLE=1``, which unpickles it in full: only for
files you trust.
"""
import os
import pickle

import torch

from .download import env_flag

__all__ = ["UnsafeCheckpointError", "RestrictedUnpickler", "load_pickle_restricted", "pickle_allowed",
           "load_checkpoint_file", "as_detectron2_checkpoint"]


class UnsafeCheckpointError(RuntimeError):
    """Loading the file would unpickle objects beyond arrays and containers, and nobody
    opted in."""


# (module, name) pairs a Detectron2 / Caffe2 .pkl needs. numpy 1.x pickles arrays through
# numpy.core, numpy 2.x through numpy._core; both spellings are accepted.
_SAFE_GLOBALS = frozenset(
    [(core + ".multiarray", "_reconstruct") for core in ("numpy.core", "numpy._core")]
    + [(core + ".multiarray", "scalar") for core in ("numpy.core", "numpy._core")]
    + [(core + ".numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
       ("builtins", "slice"), ("builtins", "complex")]
    # Python 3 pickles of bytes at protocol <= 2 spell them as _codecs.encode(str, "latin1")
    + [("_codecs", "encode")]
)
# the Python 2 names of those builtins, as Caffe2-era pickles spell them
_PY2_BUILTINS = {("__builtin__", n): (m, n) for m, n in _SAFE_GLOBALS if m == "builtins"}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for numpy arrays, numpy scalars and dtypes and plain containers
    (dict, list, tuple, OrderedDict, set, str, bytes, numbers); every other global is
    refused before it is looked up, so no constructor or function from the file is called.

    Args:
        file: the open binary file.
        name: the file's path, for error messages.
    """

    def __init__(self, file, name: str, **kwargs):
        super().__init__(file, **kwargs)
        self.name = name

    def find_class(self, module, name):
        key = _PY2_BUILTINS.get((module, name), (module, name))
        if key in _SAFE_GLOBALS:
            return super().find_class(*key)
        raise UnsafeCheckpointError(
            f"refusing to unpickle {self.name}: it asks for the global {module}.{name}, and d2seg reads "
            f".pkl checkpoints with a restricted unpickler (numpy arrays, numpy scalars and dtypes, plain "
            f"containers only), as Detectron2's model zoo and ImageNet files need. If you trust this file, "
            f"opt in to full unpickling with D2SEG_ALLOW_PICKLE=1 (or allow_pickle=True / --allow-pickle).")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"refusing to unpickle {self.name}: it holds a persistent id ({pid!r}), "
                                    f"which plain numpy pickles never do; opt in with D2SEG_ALLOW_PICKLE=1 if "
                                    f"you trust it")


def load_pickle_restricted(path: str):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (Python 2 strings as latin-1,
    as Detectron2 reads its .pkl files)."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, path, encoding="latin1").load()


def pickle_allowed(explicit=None) -> bool:
    """``explicit`` if given, else the D2SEG_ALLOW_PICKLE environment variable."""
    if explicit is not None:
        return bool(explicit)
    return env_flag("D2SEG_ALLOW_PICKLE")


def load_checkpoint_file(path: str, allow_pickle=None):
    """Load ``path`` safely (see the module docstring). Returns the unpickled object."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".pkl"):
        if pickle_allowed(allow_pickle):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        try:
            return load_pickle_restricted(path)
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise RuntimeError(f"{path} is not a readable pickle: {type(e).__name__}: {e}") from e
    if pickle_allowed(allow_pickle):
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
        detail = (lines[0] if lines else str(e).splitlines()[0])[:300]
        raise UnsafeCheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True) ({detail}): it is corrupt, or it "
            f"holds objects other than tensors and plain containers. Strip it to its state dict, or if "
            f"you trust it, opt in with D2SEG_ALLOW_PICKLE=1.") from e
    except RuntimeError as e:
        raise RuntimeError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0]}") from e


def as_detectron2_checkpoint(data, path: str):
    """An unpickled ``.pkl`` as Detectron2's checkpointer expects it: a Detectron2 model-zoo
    file (``{"model": ..., "__author__": ...}``) unchanged; a Caffe2 / Detectron1 file (its
    ``blobs``, or the dict itself for ImageNet backbones, without ``*_momentum``) as
    ``{"model": ..., "__author__": "Caffe2", "matching_heuristics": True}``, the rule of
    ``DetectionCheckpointer._load_file``."""
    if not isinstance(data, dict):
        raise TypeError(f"{path}: a .pkl checkpoint must hold a dict, got {type(data).__name__}")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
