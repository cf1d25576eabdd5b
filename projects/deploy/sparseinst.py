"""Export graph of SparseInst (with or without the PointRend refiner's absence: the plain
meta-architecture). Everything of :meth:`SparseInst.inference` is in the graph: rescored
probabilities, the class threshold, the top MAX_DETECTIONS, maskness rescoring, mask
upsampling to the padded input, cropping, resizing to the output size, the mask threshold
and the boxes of the masks.

Dynamic input height and width: the pyramid pooling's adaptive bins
(:func:`d2seg.sparseinst.encoder.adaptive_avg_pool2d_exportable`) and the decoder's
coordinate features are computed from the map size inside the graph. With the IAM location
prior (DECODER.IAM_LOCATION_PRIOR > 0) the graph has a fixed size, a multiple of 32.
"""
import math

import torch
import torch.nn.functional as F

from d2seg.pointrend.point_ops import point_sample
from d2seg.pointrend.refine import D2SegPointRendSparseInst
from d2seg.pointrend.subdivision import instance_uncertainty, subdivide
from d2seg.sparseinst.sparseinst import SparseInst, maskness, rescored_probabilities

from .graph import InstancesGraph, crop_and_resize, register_graph, topk_at_most
from .masks import mask_boxes

__all__ = ["SparseInstGraph", "RefinedSparseInstGraph"]


class SparseInstGraph(InstancesGraph):
    """SparseInst's inference as a graph (see the module doc); outputs as InstancesGraph."""

    def __init__(self, model: SparseInst):
        super().__init__(model, model.size_divisibility)
        # The IAM location prior (DECODER.IAM_LOCATION_PRIOR > 0) is computed from the map size and
        # the image's extent in Python: that variant exports at a fixed size, a multiple of the
        # size divisibility (the image then fills the padded input, as the prior assumes).
        self.dynamic_size = getattr(model.decoder.inst_branch, "location_prior", 0.0) <= 0

    def predict(self, x):
        """The decoder's outputs (SparseInst.predict) for the padded image."""
        return self.model.predict(x)

    def mask_logits(self, x, out, idx):
        """(R, Hm, Wm) mask logits of the kept candidates ``idx`` (R,)."""
        return out["pred_masks"][0, idx]

    def run(self, x, image_size, output_size):
        m = self.model
        out = self.predict(x)
        probs = rescored_probabilities(out["pred_logits"], out["pred_scores"])[0]  # (N, C)
        scores, classes = probs.max(dim=-1)
        idx = torch.nonzero(scores > m.cls_threshold)[:, 0]
        scores, top = topk_at_most(scores[idx], m.max_detections)
        idx = idx[top]
        classes = classes[idx]
        probs_m = self.mask_logits(x, out, idx).sigmoid()  # (R, Hm, Wm)
        if m.mask_rescore:
            scores = scores * maskness(probs_m, m.mask_threshold)
        # (R, 1, ...): R = 0 is a valid batch for the resizes (not a valid channel count)
        full = F.interpolate(probs_m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        masks = crop_and_resize(full, image_size, output_size)[:, 0] > m.mask_threshold
        return mask_boxes(masks), scores, classes, masks


@register_graph(SparseInst)
def _sparseinst_graph(model):
    return SparseInstGraph(model)


class RefinedSparseInstGraph(SparseInstGraph):
    """SparseInst with PointRend's refiner (``D2SegPointRendSparseInst``): the kept candidates'
    masks refined by subdivision inside the scaled boxes of their coarse masks
    (:meth:`d2seg.pointrend.refine.PointRendMaskRefiner.refine` for one image, with the boxes
    from :func:`d2seg.deploy.masks.mask_boxes`), then SparseInst's post-processing. Refining
    only the candidates SparseInst keeps gives the same results (the others are dropped).
    Fixed input size: the refiner normalises its regions by the mask size in Python."""

    def __init__(self, model):
        super().__init__(model)
        self.dynamic_size = False

    def predict(self, x):
        m = self.model
        feats = m.backbone(x)
        out = dict(m.decoder(m.encoder(feats)))
        out["fine"] = {f: feats[f] for f in m.refiner.in_features}
        return out

    def mask_logits(self, x, out, idx):
        refiner = self.model.refiner
        # one candidate more (a zero mask: left as it is), so that R >= 1 inside
        coarse = out["pred_masks"][0, idx]
        coarse = torch.cat([coarse, coarse.new_zeros((1,) + coarse.shape[1:])])[:, None]  # (R + 1, 1, h, w)
        h, w = coarse.shape[-2:]
        hp, wp = x.shape[-2:]
        steps = refiner.subdivision_steps
        if steps < 0:
            steps = max(0, math.ceil(math.log2(max(hp / h, wp / w))))
        fg = coarse[:, 0] > 0
        boxes = mask_boxes(fg)
        empty = ~fg.flatten(1).any(1)
        whole = boxes.new_tensor([0.0, 0.0, float(w), float(h)])
        boxes = torch.where(empty[:, None], whole, boxes)
        centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2 * refiner.box_scale
        boxes = torch.cat((centre - half, centre + half), dim=1)
        limit = boxes.new_tensor([float(w), float(h), float(w), float(h)])
        region = torch.minimum(boxes.clamp(min=0), limit) * (~empty)[:, None].to(boxes.dtype) / limit

        def inside(points):
            px, py = points[..., 0], points[..., 1]
            return ((px >= region[:, None, 0]) & (px <= region[:, None, 2])
                    & (py >= region[:, None, 1]) & (py <= region[:, None, 3]))

        def uncertainty(logits):
            gh, gw = logits.shape[-2:]
            ys = (torch.arange(gh, dtype=logits.dtype) + 0.5) / gh
            xs = (torch.arange(gw, dtype=logits.dtype) + 0.5) / gw
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, gh * gw, 2)
            ok = inside(grid.expand(logits.shape[0], -1, -1)).reshape(-1, 1, gh, gw)
            return instance_uncertainty(logits) - (~ok).to(logits.dtype) * 1e4

        def predict(points):
            from_coarse = point_sample(coarse, points)
            head = refiner.point_head(refiner._fine(out["fine"], 0, points), from_coarse)
            return torch.where(inside(points)[:, None], head, from_coarse)

        refined = subdivide(coarse, predict, steps, refiner.subdivision_num_points, uncertainty)
        return refined[:-1, 0]


if D2SegPointRendSparseInst is not None:
    register_graph(D2SegPointRendSparseInst)(RefinedSparseInstGraph)
