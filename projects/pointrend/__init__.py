"""PointRend (Kirillov et al., "PointRend: Image Segmentation as Rendering", CVPR 2020) for
instance segmentation (Mask R-CNN) and semantic segmentation (Semantic FPN, DeepLabV3).

Registered names (none collides with Detectron2's own PointRend project):
    ROI_HEADS_REGISTRY:      D2SegPointRendROIHeads
    ROI_MASK_HEAD_REGISTRY:  D2SegPointRendMaskHead
    SEM_SEG_HEADS_REGISTRY:  D2SegPointRendSemSegHead
    META_ARCH_REGISTRY:      D2SegPointRendSparseInst (SparseInst + PointRend refinement),
                             D2SegSemanticSegmentor (Detectron2's SemanticSegmentor with
                             MODEL.FAST_INFERENCE)
    d2seg's point heads:     PointRendMLPPointHead
Config keys: MODEL.POINTREND.* (config.py).
"""
from .config import add_d2seg_pointrend_config
from .coarse_head import PointRendCoarseMaskHead
from .compat import config_from_upstream, convert_upstream_state_dict
from .mask_head import D2SegPointRendMaskHead
from .point_head import POINTREND_POINT_HEAD_REGISTRY, PointRendMLPPointHead, build_pointrend_point_head
from .point_ops import compiled_ops_in_use, point_sample
from .point_selection import regular_grid_points, sample_training_points, uncertain_points_on_grid
from .refine import D2SegPointRendSparseInst, PointRendMaskRefiner
from .roi_heads import D2SegPointRendROIHeads
from .semantic_seg import D2SegPointRendSemSegHead, D2SegSemanticSegmentor
from .subdivision import subdivide, subdivision_steps_for

__all__ = [
    "add_d2seg_pointrend_config",
    "PointRendCoarseMaskHead",
    "config_from_upstream",
    "convert_upstream_state_dict",
    "D2SegPointRendMaskHead",
    "POINTREND_POINT_HEAD_REGISTRY",
    "PointRendMLPPointHead",
    "build_pointrend_point_head",
    "compiled_ops_in_use",
    "point_sample",
    "regular_grid_points",
    "sample_training_points",
    "uncertain_points_on_grid",
    "D2SegPointRendROIHeads",
    "D2SegPointRendSparseInst",
    "PointRendMaskRefiner",
    "D2SegPointRendSemSegHead",
    "D2SegSemanticSegmentor",
    "subdivide",
    "subdivision_steps_for",
]
