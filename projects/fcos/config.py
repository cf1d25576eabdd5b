"""Config keys of FCOS and of the one-stage meta-architecture (``MODEL.FCOS.*``,
``MODEL.ONE_STAGE_MASK_HEAD.*``).

Key names and defaults follow the public AdelaiDet FCOS where a key exists there, so its
YAML files read the same; defaults are the improved FCOS of the paper (GN towers, central
sampling r=1.5, GIoU, centerness on the box branch, normalised regression targets).
The number of detections kept at test time is Detectron2's ``TEST.DETECTIONS_PER_IMAGE``.
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_fcos_config(cfg):
    """Add ``MODEL.FCOS`` and ``MODEL.ONE_STAGE_MASK_HEAD`` to ``cfg`` in place."""
    _C = cfg
    _C.MODEL.FCOS = CN()
    # Number of foreground classes.
    _C.MODEL.FCOS.NUM_CLASSES = 80
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.FCOS.FPN_STRIDES = [8, 16, 32, 64, 128]
    # Upper bounds of max(l, t, r, b) per level; one fewer than levels (last is open).
    _C.MODEL.FCOS.SIZES_OF_INTEREST = [64, 128, 256, 512]
    # Central sampling: a location is positive only within POS_RADIUS * stride of the
    # box centre (and inside the box).
    _C.MODEL.FCOS.CENTER_SAMPLE = True
    _C.MODEL.FCOS.POS_RADIUS = 1.5
    # Head.
    _C.MODEL.FCOS.NUM_CLS_CONVS = 4
    _C.MODEL.FCOS.NUM_BOX_CONVS = 4
    _C.MODEL.FCOS.NUM_SHARE_CONVS = 0
    _C.MODEL.FCOS.NORM = "GN"  # "GN" or "none"
    _C.MODEL.FCOS.USE_SCALE = True  # learnable scalar per level on the regression output
    _C.MODEL.FCOS.USE_DEFORMABLE = False  # DCNv2 (modulated) as last conv of each tower
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    # Losses.
    _C.MODEL.FCOS.LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.LOSS_GAMMA = 2.0
    _C.MODEL.FCOS.LOC_LOSS_TYPE = "giou"  # "giou" or "iou" (-log IoU, original FCOS)
    # Smoothing of the IoU in the box loss: IoU = (inter + s) / (union + s). 0 is the exact
    # IoU; AdelaiDet adds 1 (its published configs set 1.0, see docs/fcos.md "Parity").
    _C.MODEL.FCOS.LOC_LOSS_IOU_SMOOTH = 0.0
    # Inference.
    _C.MODEL.FCOS.INFERENCE_TH_TRAIN = 0.05
    _C.MODEL.FCOS.INFERENCE_TH_TEST = 0.05
    _C.MODEL.FCOS.PRE_NMS_TOPK_TRAIN = 1000
    _C.MODEL.FCOS.PRE_NMS_TOPK_TEST = 1000
    _C.MODEL.FCOS.POST_NMS_TOPK_TRAIN = 100
    _C.MODEL.FCOS.NMS_TH = 0.6
    # Clip the candidate boxes to the image before NMS (True) or only the final detections
    # after NMS (False, AdelaiDet's order; its published configs set False).
    _C.MODEL.FCOS.CLIP_BEFORE_NMS = True
    # Threshold on cls x centerness instead of cls alone.
    _C.MODEL.FCOS.THRESH_WITH_CTR = False
    # Extension points for methods built on FCOS (see docs/fcos.md).
    # Also run inference during training (detections on the training batch).
    _C.MODEL.FCOS.YIELD_PROPOSAL = False
    # Return the per-level outputs of the cls and box towers in FCOSOutputs.
    _C.MODEL.FCOS.YIELD_BOX_FEATURES = False

    # Mask head of OneStageDetector, from ONE_STAGE_MASK_HEAD_REGISTRY; "" for none.
    _C.MODEL.ONE_STAGE_MASK_HEAD = CN()
    _C.MODEL.ONE_STAGE_MASK_HEAD.NAME = ""
    return cfg
