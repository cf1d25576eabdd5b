"""Export graph of the two-stage models (``GeneralizedRCNN``: PointRend with Mask R-CNN, and
Detectron2's Mask R-CNN): the RPN and the ROI heads' box inference (traced through Detectron2's
own tracing support: per-level top-k, NMS, box regression, score threshold, class-aware NMS,
DETECTIONS_PER_IMAGE), the mask head (PointRend: coarse head on a regular grid of P2 samples
in each box, then the subdivision steps with the point head; Mask R-CNN: Detectron2's mask
head), then Detectron2's ``detector_postprocess``: boxes rescaled, clipped, the empty ones
dropped, the mask probabilities of each detection's class pasted into the output image at
0.5. Dynamic input height and width.

Shape shorthand: R detections, P points per region, C channels, K classes.
"""
from typing import Dict, List

import torch
from torch import Tensor

from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, ImageList

from d2seg.layers.point_features import point_sample
from d2seg.pointrend.mask_head import D2SegPointRendMaskHead, _class_channel, _flat
from d2seg.pointrend.point_selection import box_points_to_image, regular_grid_points
from d2seg.pointrend.subdivision import instance_uncertainty, subdivide

from .graph import InstancesGraph, register_graph, rescale_boxes
from .masks import paste_masks

__all__ = ["RCNNGraph", "pointrend_mask_probs", "rcnn_mask_probs"]


def _sample(maps: List[Tensor], strides: List[int], boxes: Tensor, box_points: Tensor) -> Tensor:
    """(sum C, R*P) features of one image's maps (1, C, H, W) at box-relative points (R, P, 2)
    (``D2SegPointRendMaskHead._sample_maps`` for one image, sizes from the graph)."""
    pts = box_points_to_image(boxes, box_points).reshape(1, -1, 2)  # (1, R*P, 2) image pixels
    out = []
    for fmap, stride in zip(maps, strides):
        size = torch._shape_as_tensor(fmap)[2:].flip(0).to(pts.dtype) * stride  # (w, h) in pixels
        out.append(point_sample(fmap, pts / size)[0])
    return torch.cat(out, dim=0)


def pointrend_mask_probs(head: D2SegPointRendMaskHead, features: Dict[str, Tensor], boxes: Tensor,
                         classes: Tensor) -> Tensor:
    """PointRend's mask inference (``D2SegPointRendMaskHead._forward_inference``) for one image:
    boxes (R, 4), classes (R,) -> (R, S, S) mask probabilities of each detection's class. The
    point head predicts every class and the detection's is taken (PyTorch computes that one
    row only); the fine features are never projected (the same values, summed in another
    order). A zero-size region more runs through and is dropped: R >= 1 inside."""
    boxes = torch.cat([boxes, boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])])
    classes = torch.cat([classes, classes.new_zeros(1)])
    r = boxes.shape[0]
    s = head.pooler_resolution
    grid = regular_grid_points(r, s, boxes.device, boxes.dtype)
    pooled = _sample([features[f] for f in head.coarse_in_features],
                     [head.feature_strides[f] for f in head.coarse_in_features], boxes, grid)
    coarse = head.coarse_head(pooled.reshape(pooled.shape[0], r, s, s).transpose(0, 1))
    if head.point_head is None:
        return _class_channel(coarse, classes)[:-1, 0].sigmoid()
    point_maps = [features[f] for f in head.point_in_features]
    point_strides = [head.feature_strides[f] for f in head.point_in_features]

    def predict(box_points):
        fine = _sample(point_maps, point_strides, boxes, box_points)
        out = head.point_head.forward_flat(fine, _flat(point_sample(coarse, box_points)), r)  # (K, R*P)
        return _class_channel(out.reshape(out.shape[0], r, -1).transpose(0, 1), classes)

    side = head.init_side
    logits = predict(regular_grid_points(r, side, boxes.device, boxes.dtype)).reshape(r, 1, side, side)
    logits = subdivide(logits, predict, head.subdivision_steps, head.subdivision_num_points, instance_uncertainty)
    return logits[:-1, 0].sigmoid()


def rcnn_mask_probs(roi_heads, features: Dict[str, Tensor], boxes: Tensor, classes: Tensor) -> Tensor:
    """Detectron2's mask head (``StandardROIHeads._forward_mask`` and ``mask_rcnn_inference``)
    for one image: boxes (R, 4), classes (R,) -> (R, M, M) probabilities of each detection's
    class. Without their Python list of detections per image (a constant once traced), and with
    a region more, dropped after the head (its GroupNorm's reshape cannot run with R = 0)."""
    boxes = torch.cat([boxes, boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])])
    classes = torch.cat([classes, classes.new_zeros(1)])
    pooled = roi_heads.mask_pooler([features[f] for f in roi_heads.mask_in_features], [Boxes(boxes)])
    logits = roi_heads.mask_head.layers(pooled)  # (R + 1, K or 1, M, M)
    return _class_channel(logits, classes)[:-1, 0].sigmoid()


class RCNNGraph(InstancesGraph):
    """A GeneralizedRCNN's inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)
        self.has_masks = bool(model.roi_heads.mask_on)

    def run(self, x, image_size, output_size):
        m = self.model
        images = ImageList(x, [image_size])
        features = m.backbone(x)
        proposals, _ = m.proposal_generator(images, features, None)
        r = m.roi_heads._forward_box(features, proposals)[0]
        boxes, scores, classes = r.pred_boxes.tensor, r.scores, r.pred_classes
        out_boxes, keep = rescale_boxes(boxes, image_size, output_size)
        outputs = (out_boxes[keep], scores[keep], classes[keep])
        if self.has_masks:
            head = m.roi_heads.mask_head
            if isinstance(head, D2SegPointRendMaskHead):
                probs = pointrend_mask_probs(head, features, boxes, classes)
            else:
                probs = rcnn_mask_probs(m.roi_heads, features, boxes, classes)
            outputs += (paste_masks(probs[keep], out_boxes[keep], output_size, 0.5),)
        return outputs


@register_graph(GeneralizedRCNN)
def _rcnn_graph(model):
    return RCNNGraph(model)
