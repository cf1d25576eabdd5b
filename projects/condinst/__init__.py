"""CondInst (Tian, Shen, Chen, "Conditional Convolutions for Instance Segmentation",
ECCV 2020) on d2seg's FCOS, as a mask head of ``OneStageDetector``.

Modules, one job each:
    config.py        MODEL.CONDINST.* keys (AdelaiDet's names and defaults)
    mask_branch.py   MaskBranch (P3-P5 fused at 1/8 -> mask features), semantic loss,
                     aligned_upsample
    condinst.py      CondInstMaskHead: controller (top_module), dice loss on sampled
                     positives, inference and full-image mask postprocessing
    checkpoint.py    AdelaiDet key mapping
    benchmark.py     dynamic mask head: fused op vs grouped-conv composite
"""
from . import config  # noqa: F401  (registers MODEL.CONDINST keys)
from .checkpoint import convert_adelaidet_condinst
from .condinst import (
    CondInstMaskHead,
    dice_loss,
    gt_bitmasks_padded,
    mask_centers_of_mass,
    sizes_of_interest_per_level,
)
from .mask_branch import MaskBranch, aligned_upsample, semantic_targets

__all__ = [
    "CondInstMaskHead",
    "MaskBranch",
    "aligned_upsample",
    "convert_adelaidet_condinst",
    "dice_loss",
    "gt_bitmasks_padded",
    "mask_centers_of_mass",
    "semantic_targets",
    "sizes_of_interest_per_level",
]
