"""Config keys of MEInst (``MODEL.MEINST.*``).

Leaf names follow AdelaiDet's ``MODEL.MEInst.*`` where the key exists there (DIM_MASK,
MASK_SIZE, PATH_COMPONENTS, WHITEN, SIGMOID, AGNOSTIC, NUM_MASK_CONVS, MASK_LOSS_TYPE,
USE_GCN_IN_MASK, GCN_KERNEL_SIZE, LOSS_ON_MASK); the detector's keys are FCOS's
(``MODEL.FCOS.*``). Defaults are the paper's: m = 28, N = 60, L2 loss, lambda_mask = 1.
"""
from detectron2.config import CfgNode as CN

from d2seg.config import register_config


@register_config
def add_meinst_config(cfg):
    """Add ``MODEL.MEINST`` to ``cfg`` in place."""
    cfg.MODEL.MEINST = CN()
    _C = cfg.MODEL.MEINST
    # Encoding: masks cropped to their box, resized to MASK_SIZE x MASK_SIZE, encoded
    # into DIM_MASK coefficients.
    _C.MASK_SIZE = 28
    _C.DIM_MASK = 60
    # The encoding file (.npz) made by tools/meinst_encoding.py; if it records the data set
    # it was learnt from, that must be among DATASETS.TRAIN (else an error). "" means: learn
    # it from the training data on first use and cache it under $DETECTRON2_DATASETS/meinst/
    # (named after the data sets, m, N, the flags and a hash of the data).
    _C.PATH_COMPONENTS = ""
    # The training data set to learn the encoding from ("": all of DATASETS.TRAIN). It must
    # be one of DATASETS.TRAIN (else an error names the mismatch). With PATH_COMPONENTS set
    # and missing, the encoding is learnt from it into that file. Learning reads every mask
    # once (seconds on small data sets; for COCO run tools/meinst_encoding.py once).
    _C.ENCODING_DATASET = ""
    # Whiten the codes (divide by the square root of the explained variance).
    _C.WHITEN = True
    # Encode the masks in logit space (clamped to [0.01, 0.99]); decode with a sigmoid.
    _C.SIGMOID = True
    # Only class-agnostic encodings are implemented (the paper's choice).
    _C.AGNOSTIC = True
    # Mask branch: a tower parallel to FCOS's, on the same FPN levels (MODEL.FCOS.IN_FEATURES,
    # MODEL.FCOS.NORM), then a prediction layer with DIM_MASK outputs per location.
    _C.NUM_MASK_CONVS = 4
    # DCNv2 as the last conv of the mask tower (set MODEL.FCOS.USE_DEFORMABLE for the
    # cls/box towers too: the paper's "DCN in the last layer of the head").
    _C.USE_DEFORMABLE = False
    # Large-kernel prediction layer (k x 1 + 1 x k and 1 x k + k x 1) instead of 3 x 3.
    _C.USE_GCN_IN_MASK = False
    _C.GCN_KERNEL_SIZE = 9
    # Loss on the coefficients: "mse" (L2, the paper's), "l1", "smooth_l1", "cosine".
    _C.MASK_LOSS_TYPE = "mse"
    _C.MASK_LOSS_WEIGHT = 1.0
    # Implicit encoding: decode the predicted coefficients with the frozen W and apply a
    # per-pixel BCE on the m x m mask instead of a loss on the codes (needs SIGMOID).
    _C.LOSS_ON_MASK = False
    # With SIGMOID, the binary training targets are clamped to [v, 1 - v] before the logit.
    # 0: v = 0.01 (deterministic). > 0: v = max(U(0, TARGET_CLAMP_RANDOM_MAX), 0.01) per
    # pixel, drawn anew at every step: AdelaiDet's noise on the targets (its value 0.05; the
    # published COCO configs set it, see docs/meinst.md "Parity with the reference").
    _C.TARGET_CLAMP_RANDOM_MAX = 0.0
    return cfg
