"""Export graph of BlendMask (``OneStageDetector`` with ``BlendMaskHead``): FCOS's detections
(as in :mod:`d2seg.deploy.fcos`) with the attentions of the top layer at each detection, the
basis module, RoIAlign of the bases in each box (ONNX RoiAlign, half-pixel aligned), the
blender (attentions upsampled, softmax over the bases, weighted sum), and Detectron2's
``detector_postprocess``: boxes rescaled, clipped, the empty ones dropped, the (S x S) mask
probabilities pasted into the output image (:func:`d2seg.deploy.masks.paste_masks`) at
MODEL.BLENDMASK.MASK_THRESHOLD. Dynamic input height and width.
"""
import torch

from d2seg.blendmask.blendmask import BlendMaskHead

from .fcos import MASK_HEAD_GRAPHS, fcos_detections
from .graph import InstancesGraph, rescale_boxes
from .masks import paste_masks

__all__ = ["BlendMaskGraph"]


class BlendMaskGraph(InstancesGraph):
    """BlendMask's inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)
        if model.mask_head.crop_unclipped_boxes:
            raise ValueError("d2seg.deploy: BlendMask with MODEL.BLENDMASK.CROP_UNCLIPPED_BOXES True has no export "
                             "graph yet (set it False)")

    def run(self, x, image_size, output_size):
        model, head = self.model, self.model.mask_head
        features = model.backbone(x)
        det = fcos_detections(model.proposal_generator, features, image_size, top_module=head.top_layer)
        bases, _ = head.basis_module(features)
        im_inds = torch.zeros_like(det["classes"])
        probs = head.mask_logits(bases, det["boxes"], im_inds, det["top_feats"]).sigmoid()  # (R, S, S)
        boxes, keep = rescale_boxes(det["boxes"], image_size, output_size)
        boxes, probs = boxes[keep], probs[keep]
        masks = paste_masks(probs, boxes, output_size, head.mask_threshold)
        return boxes, det["scores"][keep], det["classes"][keep], masks


MASK_HEAD_GRAPHS[BlendMaskHead] = BlendMaskGraph
