"""Imports every method so that its Detectron2 registry entries exist.

Each method lives in its own folder (projects/<method>/); add its import here.
"""
from d2seg import sparseinst  # noqa: F401,E402  (SparseInst)
from d2seg import solo  # noqa: F401,E402  (SOLO, Decoupled SOLO, SOLOv2)
from d2seg import fcos  # noqa: F401,E402  (FCOS, OneStageDetector)
from d2seg import pointrend  # noqa: F401,E402  (PointRend: instance and semantic heads)
from d2seg import condinst  # noqa: F401,E402  (CondInst)
from d2seg import meinst  # noqa: F401,E402  (MEInst: mask encoding on FCOS)
from d2seg import blendmask  # noqa: F401,E402  (BlendMask)
from d2seg import pointins  # noqa: F401,E402  (PointINS: RetinaNet and FCOS variants)
