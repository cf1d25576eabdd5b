"""Config keys of SOLO, Decoupled SOLO and SOLOv2 (MODEL.SOLO.*).

Leaf names follow AdelaiDet's MODEL.SOLOV2.* so that an AdelaiDet SOLOv2 YAML reads
the same after renaming the block (see docs/solo.md). Defaults are the papers' COCO
settings (SOLO, ECCV 2020; SOLOv2, NeurIPS 2020).
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_solo_config(cfg):
    cfg.MODEL.SOLO = CN()
    _C = cfg.MODEL.SOLO
    # ---- levels: one FPN feature, stride and grid per level ----
    _C.INSTANCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Each level's feature is resized to (padded image size / stride): P2 is halved and
    # P6 doubled, as in the papers (strides 8, 8, 16, 32, 32).
    _C.FPN_INSTANCE_STRIDES = [8, 8, 16, 32, 32]
    # An instance goes to every level whose range holds sqrt(box w * box h) (inclusive).
    _C.FPN_SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    _C.NUM_GRIDS = [40, 36, 24, 16, 12]
    # Center region: the box scaled by SIGMA around the mask's center of mass (epsilon).
    _C.SIGMA = 0.2
    # How an instance's center and cells are computed: "pixel_centers" (center of mass with
    # pixel i at i + 0.5, cell = int(c / size * S)) or "adelaidet" (AdelaiDet's SOLOv2: pixel
    # i at i, i.e. half a pixel up and left, and cell = (c / size) // (1 / S) in float32).
    # The published SOLOv2 configs take "adelaidet" (docs/solo.md, "Parity with the reference").
    _C.CENTER_CONVENTION = "pixel_centers"
    # Two instances of a level claiming the same cell: "smaller" (the smaller one owns it) or
    # "later" (AdelaiDet: the later annotation's category; each claimant keeps its mask
    # target, so the cell is trained towards both masks).
    _C.CELL_CONFLICT = "smaller"
    # Mask targets at the mask output size: "area" (area average of the padded mask, soft) or
    # "bilinear" (AdelaiDet: OpenCV bilinear resize of the unpadded mask on uint8, {0, 1}).
    _C.MASK_TARGET_DOWNSAMPLE = "area"
    _C.NUM_CLASSES = 80
    # ---- instance (category + mask / kernel) branch ----
    _C.INSTANCE_IN_CHANNELS = 256
    _C.INSTANCE_CHANNELS = 256
    _C.NUM_INSTANCE_CONVS = 7
    _C.NORM = "GN"  # "GN" or "none"
    _C.PRIOR_PROB = 0.01
    # ---- SOLOv2: dynamic kernels and the unified mask feature branch ----
    _C.NUM_KERNELS = 256  # = NUM_MASKS (1x1 kernels)
    _C.USE_COORD_CONV = True
    _C.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]
    _C.MASK_IN_CHANNELS = 256
    _C.MASK_CHANNELS = 128
    _C.NUM_MASKS = 256
    # ---- inference ----
    _C.NMS_PRE = 500  # candidates kept (by maskness-rescored score) before NMS
    _C.SCORE_THR = 0.1  # category score threshold
    _C.MASK_THR = 0.5  # mask probability -> binary mask
    _C.MAX_PER_IMG = 100
    _C.NMS_TYPE = "mask"  # "mask" (hard NMS, SOLO) or "matrix" (Matrix NMS, SOLOv2)
    _C.NMS_IOU_THR = 0.5  # "mask" NMS: IoU above which a worse same-class mask is removed
    _C.NMS_KERNEL = "gaussian"  # "matrix" NMS: "gaussian" or "linear"
    _C.NMS_SIGMA = 2.0
    _C.UPDATE_THR = 0.05  # "matrix" NMS: drop masks whose decayed score is below this
    # ---- losses ----
    _C.LOSS = CN()
    _C.LOSS.FOCAL_ALPHA = 0.25
    _C.LOSS.FOCAL_GAMMA = 2.0
    _C.LOSS.FOCAL_WEIGHT = 1.0
    _C.LOSS.DICE_WEIGHT = 3.0
