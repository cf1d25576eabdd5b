"""MEInst (Zhang et al., "Mask Encoding for Single Shot Instance Segmentation", CVPR 2020):
FCOS + a mask branch regressing N PCA coefficients of the box-cropped m x m mask.

Modules, one job each:
    config.py    MODEL.MEINST.* keys
    encoding.py  the linear encoding (T, W, mean), its .npz file, streaming PCA statistics
    learn.py     learning it from a registered data set; reconstruction mIoU; cache for configs
    losses.py    L2 / L1 / smooth L1 / cosine code losses, BCE for the implicit variant
    head.py      MEInstMaskHead (ONE_STAGE_MASK_HEAD_REGISTRY "MEInstMaskHead")
    convert.py   AdelaiDet MEInst checkpoint -> d2seg state dict

Use with META_ARCHITECTURE "OneStageDetector", PROPOSAL_GENERATOR "FCOS" and
MODEL.ONE_STAGE_MASK_HEAD.NAME "MEInstMaskHead" (configs/MEInst/). See docs/meinst.md.
"""
from . import config  # noqa: F401  (registers MODEL.MEINST.*)
from .encoding import (
    MaskEncoding,
    MaskEncodingError,
    MaskEncodingParams,
    MaskStatistics,
    load_encoding,
    save_encoding,
)
from .head import LargeKernelConv, MEInstMaskHead, mask_targets_of_positives
from .learn import encoding_for_config, iter_dataset_masks, learn_encoding, reconstruction_miou
from .losses import code_loss, mask_bce_loss

__all__ = [
    "MaskEncoding",
    "MaskEncodingError",
    "MaskEncodingParams",
    "MaskStatistics",
    "load_encoding",
    "save_encoding",
    "LargeKernelConv",
    "MEInstMaskHead",
    "mask_targets_of_positives",
    "encoding_for_config",
    "iter_dataset_masks",
    "learn_encoding",
    "reconstruction_miou",
    "code_loss",
    "mask_bce_loss",
]
