"""AdelaiDet BlendMask checkpoint keys -> d2seg keys.

AdelaiDet's ``BlendMask`` meta-architecture holds ``basis_module`` and ``top_layer`` at
the top level; d2seg keeps them inside the mask head of ``OneStageDetector``. Backbone
and FCOS keys are the same in both (docs/fcos.md); the blender has no parameters.
AdelaiDet's panoptic head (``panoptic_module.*``) has no counterpart and is dropped.
"""
from typing import Dict

__all__ = ["ADELAIDET_BLENDMASK_PREFIXES", "convert_adelaidet_blendmask"]

ADELAIDET_BLENDMASK_PREFIXES = {
    "basis_module.": "mask_head.basis_module.",
    "top_layer.": "mask_head.top_layer.",
}


def convert_adelaidet_blendmask(state_dict: Dict) -> Dict:
    """Rename an AdelaiDet BlendMask ``model`` state dict to d2seg's parameter names."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("panoptic_module."):
            continue
        for old, new in ADELAIDET_BLENDMASK_PREFIXES.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out
