"""FCOS (Tian et al., ICCV 2019, and its improved version) and the one-stage
meta-architecture that d2seg's FCOS-based instance segmentation methods extend.

Modules, one job each:
    config.py       MODEL.FCOS.* and MODEL.ONE_STAGE_MASK_HEAD.* keys
    backbone.py     build_fcos_resnet_fpn_backbone (P6/P7 from P5)
    head.py         FCOSHead: cls/box towers, cls_logits, bbox_pred, ctrness, scales
    deform_conv.py  DCNv2 on torchvision (optional last tower conv)
    targets.py      locations and target assignment (size ranges, central sampling,
                    smallest-area rule), centerness targets
    losses.py       focal, GIoU x centerness, BCE centerness
    inference.py    per-level top-k, sqrt(cls x ctr), class-aware NMS
    fcos.py         FCOS (PROPOSAL_GENERATOR_REGISTRY "FCOS") and FCOSOutputs
    one_stage.py    OneStageDetector (META_ARCH_REGISTRY) and the mask-head interface

How to build a mask method on it (full description in docs/fcos.md): register a
subclass of OneStageMaskHead in ONE_STAGE_MASK_HEAD_REGISTRY and set
MODEL.ONE_STAGE_MASK_HEAD.NAME; it gets
  * in training: FCOSOutputs.positives, one row per positive location with im_inds,
    loc_inds, fpn_levels, locations (x, y), gt_inds (instance index in its image),
    gt_classes, reg_targets, predictions, and top_feats = its top_module applied on the
    box tower at that location; FCOSOutputs.bbox_towers/cls_towers with
    MODEL.FCOS.YIELD_BOX_FEATURES (gather with gather_at_locations);
  * at inference: the final detections with the same per-location fields.
"""
from . import config  # noqa: F401  (registers MODEL.FCOS keys)
from .backbone import build_fcos_resnet_fpn_backbone
from .deform_conv import ModulatedDeformConv2d
from .fcos import FCOS, FCOSOutputs, flatten_levels, gather_at_locations
from .head import FCOSHead, FCOSHeadOutputs, Scale
from .inference import decode_ltrb, fcos_inference_single_image
from .losses import FCOSLoss, iou_loss_ltrb
from .one_stage import (
    ONE_STAGE_MASK_HEAD_REGISTRY,
    OneStageDetector,
    OneStageMaskHead,
    build_one_stage_mask_head,
)
from .targets import (
    FCOSTargets,
    assign_targets,
    assign_targets_single_image,
    compute_locations,
    ctrness_targets,
    size_ranges_from_sizes_of_interest,
)

__all__ = [
    "build_fcos_resnet_fpn_backbone",
    "ModulatedDeformConv2d",
    "FCOS",
    "FCOSOutputs",
    "flatten_levels",
    "gather_at_locations",
    "FCOSHead",
    "FCOSHeadOutputs",
    "Scale",
    "decode_ltrb",
    "fcos_inference_single_image",
    "FCOSLoss",
    "iou_loss_ltrb",
    "ONE_STAGE_MASK_HEAD_REGISTRY",
    "OneStageDetector",
    "OneStageMaskHead",
    "build_one_stage_mask_head",
    "FCOSTargets",
    "assign_targets",
    "assign_targets_single_image",
    "compute_locations",
    "ctrness_targets",
    "size_ranges_from_sizes_of_interest",
]
