"""Config keys of PointINS (``MODEL.POINTINS.*``); defaults are the paper's.

The same keys drive both variants: the RetinaNet meta-architecture ``PointINSRetinaNet``
(A = 9 anchors per location) and the FCOS mask head ``PointINSMaskHead`` of
``OneStageDetector`` (A = 1, a point instead of an anchor).
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config

# The three parts of the explicit instance information I^z (paper Table 3):
#   "anchor"         I^o = {1/s, h/w, h/s, w/s} of the anchor (FCOS: {1/s} only)
#   "center_offset"  {r^x, r^y}
#   "edge_distances" {p^l, p^r, p^b, p^t}
INSTANCE_INFO_PARTS = ("anchor", "center_offset", "edge_distances")
# The three kinds of target box a sampled point may be paired with (paper Table 9).
TARGET_BOX_TYPES = ("anchor", "gt", "regressed")


@register_config
def add_pointins_config(cfg):
    """Add ``MODEL.POINTINS`` to ``cfg`` in place."""
    _C = cfg
    _C.MODEL.POINTINS = CN()
    # Instance-agnostic template (E, K, K) per point: channel up-scaling convolution of
    # the regression-tower feature to K*K*E channels, kernel UPSCALE_KERNEL_SIZE (= sqrt(E)
    # in the paper), reshaped with E innermost (paper Tables 1-2).
    _C.MODEL.POINTINS.TEMPLATE_CHANNELS = 9  # E
    _C.MODEL.POINTINS.TEMPLATE_SIZE = 16  # K
    _C.MODEL.POINTINS.UPSCALE_KERNEL_SIZE = 3
    # Instance-aware weights: ReLU(FC(I^z)) -> B x E x D (D = DYNAMIC_KERNEL_SIZE ** 2).
    _C.MODEL.POINTINS.NUM_FILTERS = 256  # B
    _C.MODEL.POINTINS.DYNAMIC_KERNEL_SIZE = 1  # sqrt(D): 1 (paper) or 3 (Table 6)
    # Parts of I^z used (any subset of INSTANCE_INFO_PARTS, paper Table 3). An empty list
    # is the "I^z from the feature map" row of Tables 3-4: the FC layer then reads the
    # point's regression-tower feature instead of explicit box information.
    _C.MODEL.POINTINS.INSTANCE_INFO = list(INSTANCE_INFO_PARTS)
    # Mask R-CNN mask head on the (B, K, K) instance-aware feature: NUM_CONV 3x3 convs,
    # a 2x deconvolution and a 1x1 class-agnostic predictor -> 2K x 2K mask logits.
    _C.MODEL.POINTINS.MASK_HEAD = CN()
    _C.MODEL.POINTINS.MASK_HEAD.NUM_CONV = 4
    _C.MODEL.POINTINS.MASK_HEAD.CONV_DIM = 256
    _C.MODEL.POINTINS.MASK_HEAD.NORM = ""  # "" or "GN"
    # Positive point sampling in training (paper Section 3.3, Tables 7-9). A point (with
    # one of its anchors) paired with a target box is positive if IoU(anchor, GT) >
    # ANCHOR_IOU_THRESH and IoU(target box, GT) > BOX_IOU_THRESH. For FCOS, which has no
    # anchor boxes, the anchor condition is FCOS's own positive assignment (the points FCOS
    # trains boxes on) and ANCHOR_IOU_THRESH is not used.
    _C.MODEL.POINTINS.ANCHOR_IOU_THRESH = 0.5
    # RetinaNet only: "IOU" (the paper: IoU(anchor, best GT) > ANCHOR_IOU_THRESH) or
    # "DETECTOR" (the anchors RetinaNet itself trains boxes on: Detectron2's matcher,
    # IoU >= 0.5 plus each GT's best anchors, so that small objects whose best anchor has
    # IoU <= 0.5 get mask samples too). FCOS always uses its own positives.
    _C.MODEL.POINTINS.ANCHOR_CONDITION = "IOU"
    _C.MODEL.POINTINS.BOX_IOU_THRESH = 0.5
    # At most this many positives per batch (<= 0: all of them).
    _C.MODEL.POINTINS.NUM_SAMPLES = 128
    # Shares of the target box types (anchor, GT, regressed box); a type with too few
    # candidates leaves its share to the other types with a non-zero share. FCOS points
    # have no anchor box: the FCOS variant needs the anchor share to be 0.
    _C.MODEL.POINTINS.SAMPLE_RATIOS = [0.05, 0.05, 0.9]
    # Loss: MASK_LOSS_WEIGHT (lambda_mask) x BCE with the target's edge pixels weighted
    # EDGE_WEIGHT (weighted mean over the pixels).
    _C.MODEL.POINTINS.MASK_LOSS_WEIGHT = 2.0
    _C.MODEL.POINTINS.EDGE_WEIGHT = 4.0
    return cfg
