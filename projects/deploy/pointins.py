"""Export graphs of PointINS on FCOS (``OneStageDetector`` with ``PointINSMaskHead``) and on
RetinaNet (``PointINSRetinaNet``): the detector's detections (FCOS: as in
:mod:`d2seg.deploy.fcos`; RetinaNet: see :class:`PointINSRetinaNetGraph`) and the box towers;
at each detection the up-scaling convolution on its k x k neighbourhood (the
instance-agnostic templates), the instance information I^z of its point or anchor and box
(or its tower features), the instance-aware weights, the instance-aware convolution,
Detectron2's mask head layers; then Detectron2's
``detector_postprocess``: boxes rescaled, clipped, the empty ones dropped, the (M x M) mask
probabilities pasted into the output image at 0.5. Dynamic input height and width.

Shape shorthand: R detections, C tower channels, k the up-scaling kernel, E x K x K the
templates, B the instance-aware filters, U the instance information.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from torchvision.ops import batched_nms

from d2seg.pointins.fcos_head import PointINSMaskHead
from d2seg.pointins.instance_info import instance_info
from d2seg.pointins.retinanet import PointINSRetinaNet

from .fcos import MASK_HEAD_GRAPHS, fcos_detections
from .graph import InstancesGraph, clip_boxes, register_graph, rescale_boxes, topk_at_most
from .masks import paste_masks

__all__ = ["PointINSGraph", "PointINSRetinaNetGraph", "patches_at", "pointins_mask_probs"]


def patches_at(towers: List[Tensor], levels: Tensor, level_inds: Tensor, k: int) -> Tensor:
    """(R, C * k * k) the k x k neighbourhood (zero padded, channel-major as a convolution's
    flattened weight) of each detection's cell on its level. towers: L maps (1, C, Hl, Wl);
    levels, level_inds: (R,) level and location index within it. Each level gathers at every
    detection (cells clamped into it) and the detection's own level is kept: no branch on the
    number of detections per level."""
    out = None
    p = k // 2
    d = torch.arange(k)
    for lvl, feat in enumerate(towers):
        size = torch._shape_as_tensor(feat)
        h, w = size[2], size[3]
        ys = torch.minimum(level_inds // w, h - 1)
        xs = level_inds % w
        padded = F.pad(feat[0], (p, p, p, p))  # (C, Hl + 2p, Wl + 2p)
        yy = ys[:, None, None] + d[None, :, None]  # (R, k, 1) in the padded map
        xx = xs[:, None, None] + d[None, None, :]  # (R, 1, k)
        index = (yy * (w + 2 * p) + xx).reshape(-1)  # (R * k * k,)
        vals = padded.flatten(1)[:, index]  # (C, R * k * k)
        vals = vals.reshape(vals.shape[0], -1, k * k).permute(1, 0, 2).flatten(1)  # (R, C * k * k)
        out = vals if out is None else torch.where((levels == lvl)[:, None], vals, out)
    return out


def pointins_mask_probs(branch, towers: List[Tensor], levels: Tensor, cells: Tensor, anchors: Tensor,
                        boxes: Tensor, strides: Tensor) -> Tensor:
    """PointINS's mask branch (``PointINSMaskBranch.predict_points``) at R detections of one
    image: towers L maps (1, C, Hl, Wl); levels, cells (R,) level and cell index within it;
    anchors (R, 4) (the points as (x, y, x, y) anchor-free); boxes (R, 4) the detected boxes;
    strides (R,) -> (R, M, M) mask probabilities relative to the boxes. The instance-aware
    convolution (1 x 1) runs as an Einsum (a batched matmul): ONNX convolutions need their group count when
    the graph is built, PyTorch groups R ways."""
    weight = branch.upscale.weight.flatten(1)  # (K*K*E, C*k*k)
    templates = branch._to_template(F.linear(patches_at(towers, levels, cells, branch.k), weight,
                                             branch.upscale.bias))  # (R, E, K, K)
    if branch.instance_info_parts:
        info = instance_info(anchors, boxes, strides, branch.instance_info_parts, branch.anchor_free)
    else:
        info = patches_at(towers, levels, cells, 1)
    weights = branch.weights_from_info(info.to(templates.dtype))[..., 0, 0]  # (R, B, E)
    feats = torch.einsum("rbe,rehw->rbhw", weights, templates)  # (R, B, K, K)
    # One zero row more through the mask head, dropped after it: ONNX Runtime cannot run the
    # GroupNorm's reshape (R, G, -1) with R = 0 (an image without detections).
    feats = torch.cat([feats, feats.new_zeros((1,) + feats.shape[1:])])
    return branch.mask_head.layers(feats)[:-1].sigmoid()[:, 0]


def _check_kernel(branch):
    if branch.d != 1:
        raise ValueError("d2seg.deploy: PointINS with MODEL.POINTINS.DYNAMIC_KERNEL_SIZE > 1 has no export graph "
                         "yet (the paper's 1 has)")


def _postprocess(det_boxes, scores, classes, probs, image_size, output_size):
    """``detector_postprocess``: boxes rescaled, clipped, empty ones dropped, masks pasted at 0.5."""
    boxes, keep = rescale_boxes(det_boxes, image_size, output_size)
    boxes, probs = boxes[keep], probs[keep]
    return boxes, scores[keep], classes[keep], paste_masks(probs, boxes, output_size, 0.5)


class PointINSGraph(InstancesGraph):
    """PointINS's (FCOS) inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)
        _check_kernel(model.mask_head.mask_branch)

    def run(self, x, image_size, output_size):
        model, head = self.model, self.model.mask_head
        features = model.backbone(x)
        det = fcos_detections(model.proposal_generator, features, image_size, yield_towers=True)
        points = det["locations"].to(torch.float32)
        strides = torch.tensor(head.strides, dtype=torch.float32)[det["fpn_levels"]]
        probs = pointins_mask_probs(head.mask_branch, det["bbox_towers"], det["fpn_levels"], det["level_inds"],
                                    torch.cat([points, points], dim=1), det["boxes"], strides)
        return _postprocess(det["boxes"], det["scores"], det["classes"], probs, image_size, output_size)


class PointINSRetinaNetGraph(InstancesGraph):
    """PointINS on RetinaNet as a graph: RetinaNet's inference (per level: sigmoid, the score
    threshold, the best TOPK_CANDIDATES_TEST, anchor deltas applied; class-aware NMS over the
    levels, the best DETECTIONS_PER_IMAGE, boxes clipped to the image), the mask branch at each
    detection's anchor, and ``detector_postprocess`` (module doc)."""

    def __init__(self, model: PointINSRetinaNet):
        super().__init__(model, model.backbone.size_divisibility)
        _check_kernel(model.mask_branch)

    def run(self, x, image_size, output_size):
        m = self.model
        feats = m.backbone(x)
        features = [feats[f] for f in m.head_in_features]
        logits, bbox_reg, towers = m.head(features)
        pred_logits, pred_deltas = m._transpose_dense_predictions([logits, bbox_reg], [m.num_classes, 4])
        anchors = m.anchor_generator(features)
        num_anchors = m.anchor_generator.num_cell_anchors[0]
        boxes_all, scores_all, classes_all, levels_all, anchors_all, cells_all = [], [], [], [], [], []
        for lvl, (anc, scores, deltas) in enumerate(zip(anchors, pred_logits, pred_deltas)):
            scores = scores[0].sigmoid()  # (Ml, K)
            idxs = torch.nonzero(scores > m.test_score_thresh)
            cand, top = topk_at_most(scores[idxs[:, 0], idxs[:, 1]], m.test_topk_candidates)
            anchor_idx, cls_idx = idxs[top, 0], idxs[top, 1]
            boxes_all.append(m.box2box_transform.apply_deltas(deltas[0][anchor_idx], anc.tensor[anchor_idx]))
            scores_all.append(cand)
            classes_all.append(cls_idx)
            levels_all.append(torch.full_like(anchor_idx, lvl))
            anchors_all.append(anc.tensor[anchor_idx])
            cells_all.append(anchor_idx // num_anchors)
        boxes, scores, classes = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(classes_all)
        keep = batched_nms(boxes, scores, classes, m.test_nms_thresh)[: m.max_detections_per_image]
        boxes = clip_boxes(boxes[keep], image_size)
        levels = torch.cat(levels_all)[keep]
        strides = torch.tensor(m.strides, dtype=torch.float32)[levels]
        probs = pointins_mask_probs(m.mask_branch, towers, levels, torch.cat(cells_all)[keep],
                                    torch.cat(anchors_all)[keep], boxes, strides)
        return _postprocess(boxes, scores[keep], classes[keep], probs, image_size, output_size)


MASK_HEAD_GRAPHS[PointINSMaskHead] = PointINSGraph


@register_graph(PointINSRetinaNet)
def _pointins_retinanet_graph(model):
    return PointINSRetinaNetGraph(model)
