"""FCOS inference: per-level candidates, score = sqrt(cls x centerness), class-aware NMS.

Shape shorthand in this module:
    K: foreground classes, L: levels, Ml = Hl * Wl locations of level l in one image,
    M = sum_l Ml, D: channels of optional per-location extras (e.g. ``top_feats``)

Per image and level: keep (location, class) pairs whose classification probability
exceeds ``score_thresh`` (or cls x centerness with ``thresh_with_ctr``), at most
``pre_nms_topk`` of them ranked by cls x centerness; decode the boxes; then over all levels
run class-aware NMS on score = sqrt(cls x centerness) and keep the best ``max_detections``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

__all__ = ["decode_ltrb", "fcos_inference_single_image"]


def decode_ltrb(locations: Tensor, ltrb: Tensor) -> Tensor:
    """Boxes from locations (P, 2) and distances (P, 4) in pixels -> (P, 4) XYXY."""
    x, y = locations[:, 0], locations[:, 1]
    return torch.stack([x - ltrb[:, 0], y - ltrb[:, 1], x + ltrb[:, 2], y + ltrb[:, 3]], dim=1)


def fcos_inference_single_image(
    logits: List[Tensor],
    bbox_reg: List[Tensor],
    ctrness: List[Tensor],
    locations: List[Tensor],
    strides: Sequence[int],
    image_size: Tuple[int, int],
    *,
    score_thresh: float,
    pre_nms_topk: int,
    nms_thresh: float,
    max_detections: int,
    thresh_with_ctr: bool = False,
    clip_before_nms: bool = True,
    extras: Optional[Dict[str, List[Tensor]]] = None,
) -> Instances:
    """Detections of one image.

    Args:
        logits: L tensors (Ml, K) classification logits.
        bbox_reg: L tensors (Ml, 4) (l, t, r, b) / stride.
        ctrness: L tensors (Ml,) centerness logits.
        locations: L tensors (Ml, 2) (x, y).
        strides: L strides.
        image_size: (h, w) of the (unpadded) input image; boxes are clipped to it (before NMS
            when ``clip_before_nms``, else the kept ones after NMS, as AdelaiDet does).
        extras: optional name -> L tensors (Ml, D) gathered at the kept locations
            (e.g. ``top_feats``) and stored in the result under the same name.
    Returns:
        Instances of at most ``max_detections`` with ``pred_boxes``, ``scores``,
        ``pred_classes`` and, per detection, ``locations`` (2,), ``fpn_levels``,
        ``loc_inds`` (index into the image's M locations) and every extra.
    """
    extras = extras or {}
    boxes_all, scores_all, classes_all, locs_all, levels_all, inds_all = [], [], [], [], [], []
    extras_all = {k: [] for k in extras}
    offset = 0
    for lvl in range(len(logits)):
        cls_prob = logits[lvl].sigmoid()  # (Ml, K)
        ctr_prob = ctrness[lvl].sigmoid()  # (Ml,)
        scores = cls_prob * ctr_prob[:, None]
        keep = (scores if thresh_with_ctr else cls_prob) > score_thresh
        cand = keep.nonzero()  # (C, 2): (location, class)
        cand_scores = scores[cand[:, 0], cand[:, 1]]
        if cand_scores.numel() > pre_nms_topk:
            cand_scores, top = cand_scores.topk(pre_nms_topk)
            cand = cand[top]
        loc_idx, cls_idx = cand[:, 0], cand[:, 1]
        ltrb = bbox_reg[lvl][loc_idx] * float(strides[lvl])
        boxes_all.append(decode_ltrb(locations[lvl][loc_idx], ltrb))
        scores_all.append(cand_scores)
        classes_all.append(cls_idx)
        locs_all.append(locations[lvl][loc_idx])
        levels_all.append(torch.full_like(loc_idx, lvl))
        inds_all.append(loc_idx + offset)
        for k, v in extras.items():
            extras_all[k].append(v[lvl][loc_idx])
        offset += logits[lvl].shape[0]

    boxes = Boxes(torch.cat(boxes_all))
    if clip_before_nms:
        boxes.clip(image_size)
    scores = torch.sqrt(torch.cat(scores_all))
    classes = torch.cat(classes_all)
    keep = batched_nms(boxes.tensor, scores, classes, nms_thresh)[:max_detections]

    result = Instances(image_size)
    result.pred_boxes = boxes[keep]
    if not clip_before_nms:
        result.pred_boxes.clip(image_size)
    result.scores = scores[keep]
    result.pred_classes = classes[keep]
    result.locations = torch.cat(locs_all)[keep]
    result.fpn_levels = torch.cat(levels_all)[keep]
    result.loc_inds = torch.cat(inds_all)[keep]
    for k, v in extras_all.items():
        result.set(k, torch.cat(v)[keep])
    return result
