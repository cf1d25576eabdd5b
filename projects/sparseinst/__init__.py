"""SparseInst: sparse instance activation maps for real-time instance segmentation
(Cheng et al., CVPR 2022). Importing this package registers its config keys, the
``SparseInst`` meta-architecture and its backbones in Detectron2's registries.
"""
from . import config  # noqa: F401  (registers MODEL.SPARSE_INST keys)
from .backbone import build_sparseinst_resnet_backbone, build_sparseinst_resnet_vd_backbone
from .decoder import BaseIAMDecoder, GroupIAMDecoder
from .encoder import InstanceContextEncoder
from .loss import SparseInstCriterion
from .matcher import SparseInstMatcher
from .sparseinst import SparseInst

__all__ = [
    "SparseInst", "InstanceContextEncoder", "BaseIAMDecoder", "GroupIAMDecoder", "SparseInstCriterion",
    "SparseInstMatcher", "build_sparseinst_resnet_backbone", "build_sparseinst_resnet_vd_backbone",
]
