"""Export graph of FCOS (``OneStageDetector`` without a mask head): the whole of
:func:`d2seg.fcos.inference.fcos_inference_single_image` and Detectron2's
``detector_postprocess`` in the graph.

Per level: sigmoid scores, the score threshold (on cls, or cls x centerness with
THRESH_WITH_CTR), the best PRE_NMS_TOPK candidates, box decoding; over the levels: clipping to
the image (before NMS with CLIP_BEFORE_NMS, after it otherwise), score = sqrt(cls x ctr),
class-aware NMS as ONNX NonMaxSuppression (torchvision's batched NMS, the same offsets per
class as PyTorch), the best DETECTIONS_PER_IMAGE; then the boxes scaled to the output size,
clipped, and the empty ones dropped. Dynamic input height and width.

Shape shorthand: K classes, Ml locations of level l, C candidates, R detections.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from d2seg.fcos.inference import decode_ltrb
from d2seg.fcos.one_stage import OneStageDetector

from .graph import InstancesGraph, clip_boxes, register_graph, rescale_boxes, topk_at_most

__all__ = ["FCOSGraph", "fcos_detections", "MASK_HEAD_GRAPHS"]


def _locations(h: Tensor, w: Tensor, stride: int) -> Tensor:
    """(Ml, 2) (x, y) of a level's locations, as d2seg.fcos.targets.compute_locations, from
    its size as tensors (dynamic in the graph)."""
    xs = torch.arange(w, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(h, dtype=torch.float32) * stride + stride // 2
    return torch.stack([xs[None, :].expand(h, w).reshape(-1), ys[:, None].expand(h, w).reshape(-1)], dim=1)


def fcos_detections(fcos, features, image_size: Tensor, top_module=None,
                    extras: Optional[Dict[str, List[Tensor]]] = None, yield_towers: bool = False) -> Dict:
    """FCOS's detections of one image (before rescaling to the output size).

    Args:
        fcos: the :class:`d2seg.fcos.FCOS` module; features: the backbone's maps by name;
        image_size: (2,) unpadded (h, w);
        top_module: a mask head's module on the box tower (e.g. CondInst's controller): its
            output at each detection is returned as ``top_feats``;
        extras: name -> L maps (1, D, Hl, Wl) on FCOS's levels (e.g. MEInst's codes), returned
            under the same name at each detection (R, D).
    Returns:
        dict of boxes (R, 4), scores (R,), classes (R,) int64, fpn_levels (R,), locations (R, 2),
        level_inds (R,) (the detection's location index within its level), unclipped_boxes
        (R, 4) (the boxes as regressed, before any clipping: BlendMask's AdelaiDet crop), with a top_module
        top_feats (R, D), the extras, and with ``yield_towers`` the L box tower maps under
        ``bbox_towers``; best score first.
    """
    feats = [features[name] for name in fcos.in_features]
    head = fcos.fcos_head(feats, top_module=top_module, yield_towers=yield_towers)
    boxes_all, scores_all, classes_all, levels_all, locs_all, inds_all = [], [], [], [], [], []
    extras = dict(extras or {})
    if top_module is not None:
        extras["top_feats"] = head.top_feats
    extras_all = {k: [] for k in extras}
    for lvl, (logits, reg, ctr) in enumerate(zip(head.logits, head.bbox_reg, head.ctrness)):
        k = logits.shape[1]
        cls_prob = logits[0].permute(1, 2, 0).reshape(-1, k).sigmoid()  # (Ml, K)
        ctr_prob = ctr[0].reshape(-1).sigmoid()  # (Ml,)
        scores = cls_prob * ctr_prob[:, None]
        keep = (scores if fcos.thresh_with_ctr else cls_prob) > fcos.score_thresh_test
        cand = torch.nonzero(keep)  # (C, 2): (location, class)
        cand_scores = scores[cand[:, 0], cand[:, 1]]
        cand_scores, top = topk_at_most(cand_scores, fcos.pre_nms_topk_test)
        loc_idx, cls_idx = cand[top, 0], cand[top, 1]
        stride = fcos.strides[lvl]
        ltrb = reg[0].permute(1, 2, 0).reshape(-1, 4)[loc_idx] * float(stride)
        locations = _locations(torch._shape_as_tensor(logits)[2], torch._shape_as_tensor(logits)[3], stride)
        boxes_all.append(decode_ltrb(locations[loc_idx], ltrb))
        scores_all.append(cand_scores)
        classes_all.append(cls_idx)
        levels_all.append(torch.full_like(loc_idx, lvl))
        locs_all.append(locations[loc_idx])
        inds_all.append(loc_idx)
        for k, maps in extras.items():
            extras_all[k].append(maps[lvl][0].permute(1, 2, 0).reshape(-1, maps[lvl].shape[1])[loc_idx])
    decoded = torch.cat(boxes_all)
    boxes = clip_boxes(decoded, image_size) if fcos.clip_before_nms else decoded
    scores = torch.sqrt(torch.cat(scores_all))
    classes = torch.cat(classes_all)
    keep = batched_nms(boxes, scores, classes, fcos.nms_thresh)[: fcos.max_detections_per_image]
    boxes = boxes[keep]
    if not fcos.clip_before_nms:
        boxes = clip_boxes(boxes, image_size)
    out = {"boxes": boxes, "scores": scores[keep], "classes": classes[keep],
           "fpn_levels": torch.cat(levels_all)[keep], "locations": torch.cat(locs_all)[keep],
           "level_inds": torch.cat(inds_all)[keep], "unclipped_boxes": decoded[keep]}
    if yield_towers:
        out["bbox_towers"] = head.bbox_towers
    for k, v in extras_all.items():
        out[k] = torch.cat(v)[keep]
    return out


class FCOSGraph(InstancesGraph):
    """FCOS's inference as a graph (module doc); outputs boxes, scores, classes."""

    has_masks = False

    def __init__(self, model: OneStageDetector):
        super().__init__(model, model.backbone.size_divisibility)

    def run(self, x, image_size, output_size):
        features = self.model.backbone(x)
        det = fcos_detections(self.model.proposal_generator, features, image_size)
        boxes, keep = rescale_boxes(det["boxes"], image_size, output_size)
        return boxes[keep], det["scores"][keep], det["classes"][keep]


# mask head class -> function(model) -> graph, for OneStageDetector with a mask head
MASK_HEAD_GRAPHS = {}


@register_graph(OneStageDetector)
def _one_stage_graph(model):
    if model.mask_head is None:
        return FCOSGraph(model)
    fn = MASK_HEAD_GRAPHS.get(type(model.mask_head))
    if fn is None:
        raise ValueError(f"d2seg.deploy has no export graph for the one-stage mask head "
                         f"{type(model.mask_head).__name__} (MODEL.ONE_STAGE_MASK_HEAD.NAME); exportable: "
                         f"{sorted(c.__name__ for c in MASK_HEAD_GRAPHS)}")
    return fn(model)
