"""Export graph of MEInst (``OneStageDetector`` with ``MEInstMaskHead``): FCOS's detections
(as in :mod:`d2seg.deploy.fcos`) with the mask codes predicted at each detection's location,
the codes decoded by the mask encoding (one matrix product and the sigmoid or clamp), and
Detectron2's ``detector_postprocess``: boxes rescaled, clipped, the empty ones dropped, the
(m x m) mask probabilities pasted into the output image at 0.5
(:func:`d2seg.deploy.masks.paste_masks`). Dynamic input height and width.
"""
from d2seg.meinst.head import MEInstMaskHead

from .fcos import MASK_HEAD_GRAPHS, fcos_detections
from .graph import InstancesGraph, rescale_boxes
from .masks import paste_masks

__all__ = ["MEInstGraph"]


class MEInstGraph(InstancesGraph):
    """MEInst's inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)
        head, fcos = model.mask_head, model.proposal_generator
        if list(head.in_features) != list(fcos.in_features):
            raise ValueError(f"d2seg.deploy: MEInst's MODEL.MEINST.IN_FEATURES {head.in_features} must be FCOS's "
                             f"levels {fcos.in_features} (the codes are read at FCOS's locations)")

    def run(self, x, image_size, output_size):
        model, head = self.model, self.model.mask_head
        features = model.backbone(x)
        codes = [head.mask_pred(head.mask_tower(features[f])) for f in head.in_features]
        det = fcos_detections(model.proposal_generator, features, image_size, extras={"codes": codes})
        probs = head.encoding.decode(det["codes"])  # (R, m, m)
        boxes, keep = rescale_boxes(det["boxes"], image_size, output_size)
        boxes, probs = boxes[keep], probs[keep]
        return boxes, det["scores"][keep], det["classes"][keep], paste_masks(probs, boxes, output_size, 0.5)


MASK_HEAD_GRAPHS[MEInstMaskHead] = MEInstGraph
