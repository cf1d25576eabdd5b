"""Export graph of PointINS on FCOS (``OneStageDetector`` with ``PointINSMaskHead``): FCOS's
detections (as in :mod:`d2seg.deploy.fcos`) and the box towers; at each detection the
up-scaling convolution on its k x k neighbourhood (the instance-agnostic templates), the
instance information I^z of its point and box (or its tower features), the instance-aware
weights, the instance-aware convolution, Detectron2's mask head layers; then Detectron2's
``detector_postprocess``: boxes rescaled, clipped, the empty ones dropped, the (M x M) mask
probabilities pasted into the output image at 0.5. Dynamic input height and width.

Shape shorthand: R detections, C tower channels, k the up-scaling kernel, E x K x K the
templates, B the instance-aware filters, U the instance information.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from d2seg.pointins.fcos_head import PointINSMaskHead
from d2seg.pointins.instance_info import instance_info

from .fcos import MASK_HEAD_GRAPHS, fcos_detections
from .graph import InstancesGraph, rescale_boxes
from .masks import paste_masks

__all__ = ["PointINSGraph", "patches_at"]


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


class PointINSGraph(InstancesGraph):
    """PointINS's (FCOS) inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)
        if model.mask_head.mask_branch.d != 1:
            raise ValueError("d2seg.deploy: PointINS with MODEL.POINTINS.DYNAMIC_KERNEL_SIZE > 1 has no export graph "
                             "yet (the paper's 1 has)")

    def run(self, x, image_size, output_size):
        model, head = self.model, self.model.mask_head
        branch = head.mask_branch
        features = model.backbone(x)
        det = fcos_detections(model.proposal_generator, features, image_size, yield_towers=True)
        towers, levels, inds = det["bbox_towers"], det["fpn_levels"], det["level_inds"]
        weight = branch.upscale.weight.flatten(1)  # (K*K*E, C*k*k)
        templates = branch._to_template(F.linear(patches_at(towers, levels, inds, branch.k), weight,
                                                 branch.upscale.bias))  # (R, E, K, K)
        if branch.instance_info_parts:
            points = det["locations"].to(torch.float32)
            strides = torch.tensor(head.strides, dtype=torch.float32)[levels]
            info = instance_info(torch.cat([points, points], dim=1), det["boxes"], strides,
                                 branch.instance_info_parts, branch.anchor_free)
        else:
            info = patches_at(towers, levels, inds, 1)
        weights = branch.weights_from_info(info.to(templates.dtype))  # (R, B, E, 1, 1)
        r, e, kk = templates.shape[0], templates.shape[1], templates.shape[-1]
        feats = torch.bmm(weights.reshape(r, branch.B, e), templates.reshape(r, e, kk * kk)).reshape(r, branch.B, kk, kk)
        probs = branch.mask_head.layers(feats).sigmoid()[:, 0]  # (R, M, M)
        boxes, keep = rescale_boxes(det["boxes"], image_size, output_size)
        boxes, probs = boxes[keep], probs[keep]
        return boxes, det["scores"][keep], det["classes"][keep], paste_masks(probs, boxes, output_size, 0.5)


MASK_HEAD_GRAPHS[PointINSMaskHead] = PointINSGraph
