"""BlendMask's config keys (``MODEL.BLENDMASK.*``, ``MODEL.BASIS_MODULE.*``) and defaults.

Key names and defaults follow the public AdelaiDet BlendMask (aim-uofa/AdelaiDet), so its
YAML files read the same; values are the paper's (Chen et al., "BlendMask: Top-Down Meets
Bottom-Up for Instance Segmentation", CVPR 2020). The panoptic head is not implemented.
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_blendmask_config(cfg):
    """Add ``MODEL.BLENDMASK`` and ``MODEL.BASIS_MODULE`` to ``cfg`` in place."""
    cfg.MODEL.BLENDMASK = CN()
    bm = cfg.MODEL.BLENDMASK
    # M: side of the top-level attention map of each basis (K x M x M numbers per
    # location, predicted by a 3x3 conv on FCOS's box tower). AdelaiDet's default 14.
    bm.ATTN_SIZE = 14
    # Interpolation of the attentions from M x M to R x R ("bilinear" or "nearest").
    bm.TOP_INTERP = "bilinear"
    # R: side of the per-instance crop of the bases (RoIAlign, aligned, sampling ratio 1).
    bm.BOTTOM_RESOLUTION = 56
    bm.POOLER_TYPE = "ROIAlignV2"  # the only one supported: aligned RoIAlign
    bm.POOLER_SAMPLING_RATIO = 1
    # Scale of the bases w.r.t. the input image (1 / their stride).
    bm.POOLER_SCALES = (0.25,)
    # Weight of the blended-mask loss.
    bm.INSTANCE_LOSS_WEIGHT = 1.0
    # Inference: foreground threshold on the pasted mask probabilities (Detectron2's
    # paste_masks_in_image).
    bm.MASK_THRESHOLD = 0.5
    # Inference: crop the bases with each detection's box as regressed, before it is clipped
    # to the image (AdelaiDet; published configs: True), instead of the clipped box. The
    # mask is pasted into the clipped box either way, so with True the part of a box that
    # leaves the image squeezes the mask of the part inside.
    bm.CROP_UNCLIPPED_BOXES = False

    # The bottom module: K bases at 1/4 from FPN features fused at IN_FEATURES[0]'s stride,
    # NUM_CONVS 3x3 convs, x2 upsampling, one more 3x3 conv, a 1x1 conv to NUM_BASES.
    cfg.MODEL.BASIS_MODULE = CN()
    bs = cfg.MODEL.BASIS_MODULE
    bs.NAME = "ProtoNet"  # the only one implemented
    bs.NUM_BASES = 4
    bs.CONVS_DIM = 128
    bs.IN_FEATURES = ["p3", "p4", "p5"]
    bs.NORM = "BN"  # AdelaiDet: "SyncBN" (multi-GPU)
    bs.NUM_CONVS = 3
    # Auxiliary semantic segmentation loss on IN_FEATURES[0] (cross-entropy over
    # NUM_CLASSES + 1 at stride COMMON_STRIDE, weighted by LOSS_WEIGHT). Targets are built
    # from the instance masks (class of the smallest instance covering each pixel).
    bs.LOSS_ON = False
    bs.ANN_SET = "coco"
    bs.NUM_CLASSES = 80
    bs.COMMON_STRIDE = 8
    bs.LOSS_WEIGHT = 0.3
    # Semantic targets of that loss, from the instance masks, at stride COMMON_STRIDE:
    #   "smallest_at_centers": class of the smallest instance covering each cell's centre pixel;
    #   "last_at_corners": AdelaiDet's labels (datasets/prepare_thing_sem_from_instance.py:
    #       instances painted in annotation order, later ones on top) read at each cell's
    #       top-left pixel (its nearest-neighbour downsampling). Published configs.
    bs.SEM_TARGETS = "smallest_at_centers"
    return cfg
