"""SparseInst's config keys (``MODEL.SPARSE_INST.*``) and their defaults.

Defaults are the paper's (Cheng et al., CVPR 2022, Sec. 3-4) where it gives a value and
hustvl/SparseInst's where it leaves one open; each such case is marked "(reference)".
The key names follow hustvl/SparseInst's so its YAML files read almost unchanged.
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_sparseinst_config(cfg):
    """Add ``MODEL.SPARSE_INST`` and ``MODEL.RESNETS.VD_*`` keys to ``cfg`` in place."""
    cfg.MODEL.SPARSE_INST = CN()
    si = cfg.MODEL.SPARSE_INST

    # Inference: keep instances whose rescored probability sqrt(p * s) exceeds
    # CLS_THRESHOLD; a mask pixel is foreground when its probability exceeds
    # MASK_THRESHOLD (reference: 0.005 and 0.45). MASK_RESCORE multiplies the score by
    # the mean probability inside the binary mask ("maskness", reference).
    si.CLS_THRESHOLD = 0.005
    si.MASK_THRESHOLD = 0.45
    si.MASK_RESCORE = True
    # Upper bound on detections per image: equals NUM_MASKS by default, so nothing is cut
    # and nothing needs sorting. Smaller values keep the first ones above threshold.
    si.MAX_DETECTIONS = 100

    # Instance context encoder: PPM on C5, FPN-style fusion of P3-P5 into 1/8 features.
    si.ENCODER = CN()
    si.ENCODER.NAME = "InstanceContextEncoder"
    si.ENCODER.IN_FEATURES = ["res3", "res4", "res5"]
    si.ENCODER.NUM_CHANNELS = 256
    si.ENCODER.PPM_POOL_SIZES = (1, 2, 3, 6)

    # IAM decoder.
    si.DECODER = CN()
    # "BaseIAMDecoder" (one map per instance) or "GroupIAMDecoder" (Group-IAM).
    si.DECODER.NAME = "GroupIAMDecoder"
    si.DECODER.NUM_MASKS = 100  # N
    si.DECODER.NUM_CLASSES = 80
    si.DECODER.KERNEL_DIM = 128  # D of the mask kernels / mask features (reference)
    # Output masks are predicted at 1/8 and upsampled by this factor (to 1/4) for the
    # loss; inference upsamples them further to the input (reference).
    si.DECODER.SCALE_FACTOR = 2.0
    si.DECODER.GROUPS = 4
    si.DECODER.OUTPUT_IAM = False
    # Norm after each 3x3 conv of both branches ("" = none, as in the paper; "GN" helps
    # from-scratch training). Non-empty values add `.norm` parameters.
    si.DECODER.NORM = ""
    # Kernel x mask-feature product: "auto" uses d2seg.layers.dynamic_kernel_product (plain
    # PyTorch per-image matmuls, not a compiled op) when it exists, "torch" always uses bmm.
    si.DECODER.KERNEL_PRODUCT = "torch"
    # d2seg's departure for training from scratch (docs/sparseinst.md, issue 16): when > 0,
    # the IAM logits of instance i get a log-Gaussian prior of this sigma (map coordinates
    # in [0, 1]) around the i-th cell of a ceil(sqrt(N))^2 grid, so that instances start
    # from different places instead of the same near-uniform average. 0 = off (the paper's
    # and the reference's decoder; their checkpoints assume it).
    si.DECODER.IAM_LOCATION_PRIOR = 0.0
    si.DECODER.INST = CN()
    si.DECODER.INST.DIM = 256
    si.DECODER.INST.CONVS = 4
    si.DECODER.MASK = CN()
    si.DECODER.MASK.DIM = 256
    si.DECODER.MASK.CONVS = 4

    # Loss weights: lambda_c, lambda_dice, lambda_pix, lambda_s (paper: 2, 2, 2, 1;
    # hustvl/SparseInst's code uses 5 for the pixel term, and so do the published COCO configs
    # (Base-SparseInst.yaml), the reference's behaviour; the default here is the paper's 2).
    si.LOSS = CN()
    si.LOSS.CLASS_WEIGHT = 2.0
    si.LOSS.MASK_DICE_WEIGHT = 2.0
    si.LOSS.MASK_PIXEL_WEIGHT = 2.0
    si.LOSS.OBJECTNESS_WEIGHT = 1.0
    # How ground-truth masks (padded to the batch's padded size) are brought to the mask
    # output's resolution (1/4) for matching and losses: "area" (averaging, soft targets that
    # keep every pixel's contribution) or "bilinear" (align_corners=False, as hustvl/SparseInst
    # does; at a factor of 4 it reads only 2x2 of every 4x4 input pixels). The published COCO
    # configs (Base-SparseInst.yaml) set "bilinear" so that hustvl's checkpoints and recipe
    # reproduce; the default keeps d2seg's "area".
    si.LOSS.TARGET_DOWNSAMPLE = "area"
    si.LOSS.FOCAL_ALPHA = 0.25
    si.LOSS.FOCAL_GAMMA = 2.0

    # Matching score C(i, k) = p^BETA * DICE^ALPHA with BETA = 1 - ALPHA in the paper.
    si.MATCHER = CN()
    si.MATCHER.ALPHA = 0.8
    si.MATCHER.BETA = 0.2
    # d2seg's departure for training from scratch (docs/sparseinst.md), used with
    # DECODER.IAM_LOCATION_PRIOR: when > 0 the matching score of prediction i and object k is
    # also multiplied by exp(-d^2 / (2 sigma^2)), d the distance (map coordinates in [0, 1])
    # from prediction i's grid cell to the object's mask centroid, so that an object is given
    # to a prediction that starts near it. 0 = off (the paper's and the reference's matching).
    si.MATCHER.LOCATION_SIGMA = 0.0

    # ResNet-D ("R-50-d", timm naming as in hustvl/SparseInst's resnet50d checkpoints):
    # deep 3x3 stem of this width, average-pool shortcut. Uses MODEL.RESNETS.DEPTH /
    # NORM / DEFORM_ON_PER_STAGE / DEFORM_MODULATED / OUT_FEATURES.
    cfg.MODEL.RESNETS.VD_STEM_WIDTH = 32
