"""CondInst's config keys (``MODEL.CONDINST.*``) and their defaults.

Key names and defaults follow the public AdelaiDet CondInst (aim-uofa/AdelaiDet), so its
YAML files read the same; values are the paper's (Tian, Shen, Chen, "Conditional
Convolutions for Instance Segmentation", ECCV 2020).
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_condinst_config(cfg):
    """Add ``MODEL.CONDINST`` to ``cfg`` in place."""
    cfg.MODEL.CONDINST = CN()
    ci = cfg.MODEL.CONDINST
    # Stride of the predicted masks w.r.t. the input image (the mask branch runs at the
    # stride of its first input feature, 8 for P3; the dynamic head's output is upsampled
    # from there to MASK_OUT_STRIDE).
    ci.MASK_OUT_STRIDE = 4
    # Training: at most this many positive locations (random subsample) get a mask loss;
    # -1 keeps all (the paper's COCO configs use 500).
    ci.MAX_PROPOSALS = -1
    # Training: at most about this many positives per image, as AdelaiDet splits it: each
    # ground-truth object of the image with positives keeps its max(1, int(TOPK / #objects))
    # positives of highest predicted score (cls x centerness); -1 keeps all. Applied before
    # MAX_PROPOSALS (AdelaiDet accepts only one of the two).
    ci.TOPK_PROPOSALS_PER_IM = -1
    # Inference: a mask pixel is foreground when its probability exceeds this.
    ci.MASK_THRESHOLD = 0.5
    # Upsampling of the mask branch's coarser inputs (P4, P5 -> P3), of the dynamic head's
    # output (-> MASK_OUT_STRIDE) and of the inference masks (-> input):
    #   "centers":   bilinear with pixel centres aligned (F.interpolate, align_corners=False);
    #                the grid of the FCOS locations and of the mask targets (j*s + s//2).
    #   "adelaidet": AdelaiDet's aligned_bilinear (output pixel i reads the input at
    #                (i - factor//2) / factor, clamped): a shift of up to half an input pixel
    #                towards the top-left. Its checkpoints expect it (published configs).
    ci.UPSAMPLING = "centers"
    # Central sampling (MODEL.FCOS.CENTER_SAMPLE) around each mask's centre of mass instead
    # of its box centre, as AdelaiDet's CondInst does (published configs: True). The centre
    # is the mean pixel index of the mask at the padded input resolution (AdelaiDet's
    # convention: pixel j counts at j, not at its centre j + 0.5).
    ci.MASK_CENTER_SAMPLING = False

    # The dynamic mask head: NUM_LAYERS 1x1 convs of CHANNELS channels whose weights are
    # predicted per instance by the controller (3 layers, 8 channels -> 169 parameters).
    ci.MASK_HEAD = CN()
    ci.MASK_HEAD.CHANNELS = 8
    ci.MASK_HEAD.NUM_LAYERS = 3
    # Ablation "w/o relative coordinates": feed only the mask features.
    ci.MASK_HEAD.DISABLE_REL_COORDS = False

    # The mask branch: features of IN_FEATURES fused at the first one's stride, a tower
    # of NUM_CONVS 3x3 convs of CHANNELS, then a 1x1 conv to OUT_CHANNELS mask features.
    # OUT_CHANNELS = 0 is the ablation "w/o mask features" (relative coordinates only).
    ci.MASK_BRANCH = CN()
    ci.MASK_BRANCH.OUT_CHANNELS = 8
    ci.MASK_BRANCH.IN_FEATURES = ["p3", "p4", "p5"]
    ci.MASK_BRANCH.CHANNELS = 128
    ci.MASK_BRANCH.NORM = "BN"
    ci.MASK_BRANCH.NUM_CONVS = 4
    # Auxiliary semantic segmentation loss on the first input feature ("w/ sem.").
    ci.MASK_BRANCH.SEMANTIC_LOSS_ON = False
    return cfg
