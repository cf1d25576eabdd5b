"""Reading checkpoint files without running code from them.

- ``.pth`` (and anything that is not ``.pkl``): ``torch.load(weights_only=True)``, which
  unpickles tensors, numbers, strings and containers only. A file that needs more (custom
  classes) is refused with a message saying so.
- ``.pkl`` (Detectron2's and Caffe2's model-zoo format) is a plain pickle, which can run
  arbitrary code. It is read only when the file was verified against a sha256 in the
  model zoo's own table (:mod:`d2seg.model_zoo.registry`), or when the caller opts in
  (``allow_pickle=True`` or ``D2SEG_ALLOW_PICKLE=1``).
"""
import os
import pickle

import torch

__all__ = ["UnsafeCheckpointError", "pickle_allowed", "load_checkpoint_file"]


class UnsafeCheckpointError(RuntimeError):
    """Loading the file would unpickle arbitrary objects and nobody opted in."""


def pickle_allowed(explicit=None) -> bool:
    if explicit is not None:
        return bool(explicit)
    return os.environ.get("D2SEG_ALLOW_PICKLE", "").strip().lower() in ("1", "true", "yes", "on")


def _pkl_refusal(path):
    return UnsafeCheckpointError(
        f"refusing to unpickle {path}: Detectron2 .pkl files can run arbitrary code. Only .pkl files "
        f"verified against a sha256 in d2seg's model zoo table are read without asking; if you trust "
        f"this file, opt in with D2SEG_ALLOW_PICKLE=1 (or allow_pickle=True / --allow-pickle).")


def load_checkpoint_file(path: str, allow_pickle=None):
    """Load ``path`` safely (see the module docstring). Returns the unpickled object."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".pkl"):
        if not pickle_allowed(allow_pickle):
            raise _pkl_refusal(path)
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
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
