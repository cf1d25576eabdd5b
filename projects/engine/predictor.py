"""d2seg's PyTorch predictor: Detectron2's ``DefaultPredictor`` with d2seg's checkpoint
loading and ``TEST.PRECISION`` (:mod:`d2seg.engine.precision`)."""
from detectron2.engine import DefaultPredictor

from .checkpoint import AtomicCheckpointer
from .precision import at_precision

__all__ = ["Predictor"]


class Predictor(DefaultPredictor):
    """``predictor(bgr_uint8_image)`` -> ``{"instances": ...}`` / ``{"sem_seg": ...}`` as
    Detectron2's ``DefaultPredictor``, with two differences:

    - the weights (``weights``, default ``cfg.MODEL.WEIGHTS``; none if empty) are loaded by
      d2seg's checkpointer (checked downloads, weights_only loading, the .pkl rule, automatic
      conversion of AdelaiDet / SparseInst / upstream PointRend checkpoints), not unpickled
      by Detectron2's loader;
    - the model runs at ``cfg.TEST.PRECISION`` (bfloat16: under ``torch.autocast``, results
      cast back to float32). An unknown value, or bfloat16 on a device without support, is
      an error at construction.

    ``self.model`` is the plain model (float32 parameters) in both precisions.
    """

    def __init__(self, cfg, weights=None):
        weights = cfg.MODEL.WEIGHTS if weights is None else weights
        bare = cfg.clone()
        bare.defrost()
        bare.MODEL.WEIGHTS = ""
        bare.freeze()
        super().__init__(bare)
        if weights:
            AtomicCheckpointer(self.model).load(weights)
        self._run = at_precision(cfg, self.model)

    def __call__(self, original_image):
        """original_image: (H, W, 3) uint8 in BGR (cv2.imread's order)."""
        model, self.model = self.model, self._run
        try:
            return super().__call__(original_image)
        finally:
            self.model = model
