"""SOLO, Decoupled SOLO and SOLOv2: instance segmentation by locations.

Meta-architectures ``SOLO``, ``DecoupledSOLO`` and ``SOLOv2`` (Detectron2's
META_ARCH_REGISTRY), config keys under MODEL.SOLO. See docs/solo.md.
"""
from . import config  # noqa: F401  (registers MODEL.SOLO.*)
from .solo import SOLO, DecoupledSOLO, SOLOBase, SOLOv2

__all__ = ["SOLO", "DecoupledSOLO", "SOLOBase", "SOLOv2"]
