"""Export graph of BlendMask (``OneStageDetector`` with ``BlendMaskHead``): FCOS's detections
(as in :mod:`d2seg.deploy.fcos`) with the attentions of the top layer at each detection, the
basis module, RoIAlign of the bases in each box, the blender (attentions upsampled, softmax
over the bases, weighted sum), and Detectron2's ``detector_postprocess``: boxes rescaled,
clipped, the empty ones dropped, the (S x S) mask probabilities pasted into the output image
(:func:`d2seg.deploy.masks.paste_masks`) at MODEL.BLENDMASK.MASK_THRESHOLD. Dynamic input
height and width.

The crop, as the PyTorch head does it:
    CROP_UNCLIPPED_BOXES False: the clipped detection boxes, with ONNX RoiAlign (half-pixel
        aligned; the boxes lie in the image, where it equals torchvision's roi_align);
    CROP_UNCLIPPED_BOXES True (AdelaiDet's convention, the COCO configs): the boxes as FCOS
        regressed them, before clipping (``fcos_detections``' ``unclipped_boxes``), with the
        same ONNX RoiAlign (it equals torchvision's roi_align outside the
        map too: zeros beyond -1, clamped between -1 and 0; tests/test_deploy_roi_align.py).
        The masks are pasted into the clipped boxes in both cases.
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

    def run(self, x, image_size, output_size):
        model, head = self.model, self.model.mask_head
        features = model.backbone(x)
        det = fcos_detections(model.proposal_generator, features, image_size, top_module=head.top_layer)
        bases, _ = head.basis_module(features)
        crop_boxes = det["unclipped_boxes"] if head.crop_unclipped_boxes else det["boxes"]
        im_inds = torch.zeros_like(det["classes"])
        probs = head.mask_logits(bases, crop_boxes, im_inds, det["top_feats"]).sigmoid()  # (R, S, S)
        boxes, keep = rescale_boxes(det["boxes"], image_size, output_size)
        boxes, probs = boxes[keep], probs[keep]
        masks = paste_masks(probs, boxes, output_size, head.mask_threshold)
        return boxes, det["scores"][keep], det["classes"][keep], masks


MASK_HEAD_GRAPHS[BlendMaskHead] = BlendMaskGraph
