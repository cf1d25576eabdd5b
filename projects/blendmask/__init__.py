"""BlendMask (Chen et al., "BlendMask: Top-Down Meets Bottom-Up for Instance
Segmentation", CVPR 2020) on d2seg's FCOS, as a mask head of ``OneStageDetector``.

Modules, one job each:
    config.py        MODEL.BLENDMASK.* and MODEL.BASIS_MODULE.* keys (AdelaiDet's names)
    basis_module.py  BasisModule: K bases at 1/4 from FPN features, semantic loss
    blender.py       crop_bases (aligned RoIAlign) and blend (softmax-weighted sum)
    blendmask.py     BlendMaskHead: top_layer (top_module), loss, inference
    checkpoint.py    AdelaiDet key mapping
"""
from . import config  # noqa: F401  (registers MODEL.BLENDMASK / MODEL.BASIS_MODULE keys)
from .basis_module import BasisModule
from .blender import blend, crop_bases
from .blendmask import BlendMaskHead
from .checkpoint import convert_adelaidet_blendmask

__all__ = ["BasisModule", "BlendMaskHead", "blend", "crop_bases", "convert_adelaidet_blendmask"]
