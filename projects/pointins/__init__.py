"""PointINS (Qi et al., "PointINS: Point-based Instance Segmentation", TPAMI 2021):
instance-aware convolution on the regression tower of a dense one-stage detector.

Modules, one job each:
    config.py         MODEL.POINTINS.* keys (paper defaults)
    instance_info.py  I^z = {I^o, I^q} (paper eqs. 3-5)
    sampling.py       positive (point, target box) sampling: thresholds, cap, type ratios
    losses.py         mask targets (GT cropped to the target box), edge-weighted BCE
    mask_branch.py    templates at points, instance-aware weights and convolution, mask
                      head, and the training loss; shared by both variants
    retinanet.py      PointINSRetinaNet (META_ARCH_REGISTRY): RetinaNet, A = 9
    fcos_head.py      PointINSMaskHead (ONE_STAGE_MASK_HEAD_REGISTRY) on OneStageDetector
    mask_quality.py   mask IoU given the detected boxes (python -m d2seg.pointins.mask_quality)
"""
from . import config  # noqa: F401  (registers MODEL.POINTINS keys)
from .config import INSTANCE_INFO_PARTS, TARGET_BOX_TYPES
from .fcos_head import PointINSMaskHead
from .instance_info import instance_info, instance_info_size
from .losses import edge_pixels, edge_weighted_bce, mask_targets
from .mask_branch import PointCandidates, PointINSMaskBranch, gather_patches
from .retinanet import PointINSRetinaNet, PointINSRetinaNetHead
from .sampling import sample_positive_pairs, type_quotas

__all__ = [
    "INSTANCE_INFO_PARTS",
    "TARGET_BOX_TYPES",
    "PointINSMaskHead",
    "instance_info",
    "instance_info_size",
    "edge_pixels",
    "edge_weighted_bce",
    "mask_targets",
    "PointCandidates",
    "PointINSMaskBranch",
    "gather_patches",
    "PointINSRetinaNet",
    "PointINSRetinaNetHead",
    "sample_positive_pairs",
    "type_quotas",
]
