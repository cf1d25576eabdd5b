"""Loading hustvl/SparseInst checkpoints.

Our parameter names equal hustvl/SparseInst's (docs/sparseinst.md lists them), so the key
mapping is the identity on the model's keys; this module only unwraps the checkpoint and
checks that nothing is missing or left over.
"""
from typing import Dict

import torch


def convert_hustvl_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """A hustvl/SparseInst checkpoint (``{"model": state_dict, ...}`` or a bare state dict)
    -> a state dict for :class:`d2seg.sparseinst.SparseInst`."""
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):  # saved from DistributedDataParallel
            k = k[len("module."):]
        if k in ("pixel_mean", "pixel_std"):
            continue  # ours are non-persistent buffers set from the config
        out[k] = torch.as_tensor(v)
    return out


def load_hustvl_checkpoint(model, path_or_checkpoint) -> None:
    """Load a hustvl/SparseInst ``.pth`` (path or loaded object) into ``model``; raises
    naming the keys that do not match."""
    ckpt = path_or_checkpoint
    if isinstance(ckpt, str):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = convert_hustvl_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"hustvl/SparseInst checkpoint does not match the model: missing {missing[:10]}, "
                       f"unexpected {unexpected[:10]} (check the backbone and decoder config)")
