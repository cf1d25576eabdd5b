"""AdelaiDet CondInst checkpoint keys -> d2seg keys.

AdelaiDet's ``CondInst`` meta-architecture holds ``controller`` and ``mask_branch`` at the
top level; d2seg keeps them inside the mask head of ``OneStageDetector``. Backbone and
FCOS keys are the same in both (docs/fcos.md). AdelaiDet's ``mask_head`` has no
parameters (its weights are the controller's output), only buffers that d2seg recomputes:
``mask_head.sizes_of_interest`` (from ``MODEL.FCOS.SIZES_OF_INTEREST``) and ``mask_head._iter``
(BoxInst's iteration counter); both are dropped.
"""
from typing import Dict

__all__ = ["ADELAIDET_CONDINST_DROPPED", "ADELAIDET_CONDINST_PREFIXES", "convert_adelaidet_condinst"]

# AdelaiDet keys without a d2seg counterpart (recomputed from the config).
ADELAIDET_CONDINST_DROPPED = ("mask_head.sizes_of_interest", "mask_head._iter")

# AdelaiDet prefix -> d2seg prefix (everything else is kept as is).
ADELAIDET_CONDINST_PREFIXES = {
    "controller.": "mask_head.controller.",
    "mask_branch.": "mask_head.mask_branch.",
}


def convert_adelaidet_condinst(state_dict: Dict) -> Dict:
    """Rename an AdelaiDet CondInst ``model`` state dict to d2seg's parameter names."""
    out = {}
    for k, v in state_dict.items():
        if k in ADELAIDET_CONDINST_DROPPED:
            continue
        for old, new in ADELAIDET_CONDINST_PREFIXES.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out
