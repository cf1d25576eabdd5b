"""PointRend's config keys: everything lives under MODEL.POINTREND, so that Detectron2's
own PointRend project (whose ``add_pointrend_config`` writes MODEL.POINT_HEAD and
MODEL.ROI_MASK_HEAD.{FC_DIM, NUM_FC, ...}) can be configured in the same process and on
the same config object. Detectron2's built-in keys are reused where they exist:
ROI_HEADS.NUM_CLASSES, ROI_MASK_HEAD.{POOLER_RESOLUTION, CONV_DIM, CLS_AGNOSTIC_MASK},
SEM_SEG_HEAD.{NUM_CLASSES, IGNORE_VALUE}. Defaults are the paper's.
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_d2seg_pointrend_config(cfg):
    pr = cfg.MODEL.POINTREND = CN()
    # Fine-grained feature maps sampled at the points (P2 in the paper).
    pr.IN_FEATURES = ("p2",)
    # False: the coarse mask head alone (no point head; the paper's ablation baseline).
    pr.POINT_HEAD_ON = True

    # Lightweight coarse mask head: S x S P2 features by bilinear sampling inside the box
    # (S = ROI_MASK_HEAD.POOLER_RESOLUTION, 14), a 2x2 stride-2 conv of ROI_MASK_HEAD.CONV_DIM
    # channels, NUM_FC fully connected layers of FC_DIM, K x M x M output (M = 7).
    pr.COARSE_HEAD = CN()
    pr.COARSE_HEAD.IN_FEATURES = ("p2",)
    pr.COARSE_HEAD.FC_DIM = 1024
    pr.COARSE_HEAD.NUM_FC = 2
    pr.COARSE_HEAD.OUTPUT_SIDE_RESOLUTION = 7

    # Point head: MLP with NUM_FC hidden layers of FC_DIM; the K coarse prediction
    # features are concatenated to every layer's input (COARSE_PRED_EACH_LAYER).
    pr.POINT_HEAD = CN()
    pr.POINT_HEAD.NAME = "PointRendMLPPointHead"
    pr.POINT_HEAD.FC_DIM = 256
    pr.POINT_HEAD.NUM_FC = 3
    pr.POINT_HEAD.CLS_AGNOSTIC_MASK = False
    pr.POINT_HEAD.COARSE_PRED_EACH_LAYER = True

    # Training-time point selection: N points per region, k*N candidates, beta*N most
    # uncertain of them plus (1 - beta)*N uniform points.
    pr.TRAIN_NUM_POINTS = 14 * 14
    pr.OVERSAMPLE_RATIO = 3
    pr.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Train the mask head on the box head's regressed boxes (cascade-style training).
    pr.CASCADE_TRAINING = False
    # With cascade training (CASCADE_TRAINING or ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES): clip the
    # regressed training boxes to the image (True, d2seg's default: no points are drawn
    # outside the image) or keep them as regressed (False, as Detectron2's PointRend; the
    # published COCO/Cityscapes configs set False so that the reference's recipe reproduces).
    pr.CLIP_TRAIN_BOXES = True

    # Inference: adaptive subdivision, 7x7 -> 7 * 2**STEPS, N points per step.
    pr.SUBDIVISION_STEPS = 5
    pr.SUBDIVISION_NUM_POINTS = 28 * 28
    # Apply the point head's first layer to the P2 map once and sample the result
    # ("auto": when more points are predicted than the map has positions).
    pr.PROJECT_FINE_FEATURES = "auto"

    # Semantic segmentation (D2SegPointRendSemSegHead).
    pr.SEM_SEG = CN()
    # Coarse semantic head from SEM_SEG_HEADS_REGISTRY ("SemSegFPNHead", "DeepLabV3Head").
    pr.SEM_SEG.COARSE_HEAD_NAME = "SemSegFPNHead"
    # Points per image in training (stride-16 map of a 512x1024 crop: 2048).
    pr.SEM_SEG.TRAIN_NUM_POINTS = 2048
    # Points per subdivision step (8096 in the paper for 1024x2048 inputs).
    pr.SEM_SEG.SUBDIVISION_NUM_POINTS = 8096
    # -1: subdivide until the prediction has the input's resolution.
    pr.SEM_SEG.SUBDIVISION_STEPS = -1

    # Plug-in refinement of another detector's image-level masks (refine.py), e.g.
    # META_ARCHITECTURE "D2SegPointRendSparseInst": fine features, training points per
    # instance (drawn in its ground-truth box scaled by BOX_SCALE), points per subdivision
    # step and steps (-1: until the input resolution).
    pr.REFINE = CN()
    pr.REFINE.IN_FEATURES = ("res2",)
    pr.REFINE.TRAIN_NUM_POINTS = 14 * 14
    pr.REFINE.BOX_SCALE = 1.2
    pr.REFINE.SUBDIVISION_NUM_POINTS = 28 * 28
    pr.REFINE.SUBDIVISION_STEPS = -1

    # DeepLabV3 as the coarse semantic head needs Detectron2's DeepLab project keys
    # (SEM_SEG_HEAD.ASPP_*, RESNETS.STEM_TYPE, ...); they only add keys read by DeepLab's
    # own modules.
    if "ASPP_CHANNELS" not in cfg.MODEL.SEM_SEG_HEAD:
        try:
            from detectron2.projects.deeplab import add_deeplab_config
        except ImportError:  # pragma: no cover - DeepLab project not installed
            return
        add_deeplab_config(cfg)
