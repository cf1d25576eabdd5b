"""PointINS on d2seg's FCOS (A = 1: a point instead of an anchor), as a mask head of
:class:`d2seg.fcos.OneStageDetector` (``MODEL.ONE_STAGE_MASK_HEAD.NAME: PointINSMaskHead``).

Shape shorthand in this module:
    N: images, L: levels, Hl, Wl: size of level l, M = sum_l Hl * Wl locations per image,
    P: FCOS positives of the batch, R: detections

The paper treats FCOS's points as anchors (Section 3.2.2): I^z = {1/s} + I^q with the
point as (x^o, y^o) (U = 7). The anchor condition of the sampling (IoU(anchor, GT) > 0.5 in
RetinaNet, "only anchors ... used for box training") becomes FCOS's own positives: the
points FCOS trains boxes on. A point has no anchor box, so its target box is the GT or its
regressed box (MODEL.POINTINS.SAMPLE_RATIOS[0] must be 0). Needs the box tower maps:
MODEL.FCOS.YIELD_BOX_FEATURES: True.
"""
from typing import Dict, List

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.structures.boxes import matched_pairwise_iou

from d2seg.fcos import ONE_STAGE_MASK_HEAD_REGISTRY, OneStageMaskHead
from d2seg.fcos.inference import decode_ltrb

from .mask_branch import PointCandidates, PointINSMaskBranch

__all__ = ["PointINSMaskHead"]


def _cells(loc_inds: Tensor, levels: Tensor, sizes: List[tuple]):
    """Row and column on its level of each location index in [0, M)."""
    starts = torch.tensor([0] + [h * w for h, w in sizes[:-1]], device=loc_inds.device).cumsum(0)
    widths = torch.tensor([w for _, w in sizes], device=loc_inds.device)
    j = loc_inds - starts[levels]
    return j // widths[levels], j % widths[levels]


@ONE_STAGE_MASK_HEAD_REGISTRY.register()
class PointINSMaskHead(OneStageMaskHead):
    """The PointINS mask branch on FCOS's box tower (attribute ``mask_branch``)."""

    @configurable
    def __init__(self, *, mask_branch: PointINSMaskBranch, strides: List[int]):
        super().__init__()
        if not mask_branch.anchor_free:
            raise ValueError("PointINSMaskHead needs an anchor-free mask branch (anchor_free=True).")
        if mask_branch.sample_ratios[0] > 0:
            raise ValueError(
                "PointINS on FCOS: points have no anchor box, so MODEL.POINTINS.SAMPLE_RATIOS[0] "
                f"(the anchor share) must be 0; got {list(mask_branch.sample_ratios)} "
                "(the FCOS configs use [0.0, 0.1, 0.9])."
            )
        self.mask_branch = mask_branch
        self.strides = [int(s) for s in strides]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.FCOS.YIELD_BOX_FEATURES:
            raise ValueError("PointINSMaskHead reads FCOS's box tower: set MODEL.FCOS.YIELD_BOX_FEATURES: True.")
        channels = {input_shape[f].channels for f in cfg.MODEL.FCOS.IN_FEATURES}
        if len(channels) != 1:
            raise ValueError(f"PointINSMaskHead: MODEL.FCOS.IN_FEATURES must have equal channels, got {channels}.")
        return {
            "mask_branch": PointINSMaskBranch(cfg, in_channels=channels.pop(), anchor_free=True),
            "strides": cfg.MODEL.FCOS.FPN_STRIDES,
        }

    def _strides_of(self, levels: Tensor) -> Tensor:
        return torch.tensor(self.strides, dtype=torch.float32, device=levels.device)[levels]

    def mask_candidates(self, fcos_outputs, gt_instances: List[Instances]) -> PointCandidates:
        """FCOS's positives with their target boxes (no anchor box, GT, regressed box)."""
        pos = fcos_outputs.positives
        towers = fcos_outputs.bbox_towers
        sizes = [tuple(t.shape[-2:]) for t in towers]
        ys, xs = _cells(pos.loc_inds, pos.fpn_levels, sizes)
        strides = self._strides_of(pos.fpn_levels)
        points = pos.locations.float()
        gt_box = torch.zeros((len(pos), 4), device=points.device)
        for i, gt in enumerate(gt_instances):
            sel = (pos.im_inds == i).nonzero(as_tuple=True)[0]
            if len(sel):
                gt_box[sel] = gt.gt_boxes.tensor[pos.gt_inds[sel]].to(gt_box.dtype)
        reg = decode_ltrb(points, pos.reg_pred.detach().float() * strides[:, None])
        for i, (h, w) in enumerate(fcos_outputs.image_sizes):
            sel = pos.im_inds == i
            reg[sel, 0::2] = reg[sel, 0::2].clamp(0, w)
            reg[sel, 1::2] = reg[sel, 1::2].clamp(0, h)
        reg_iou = matched_pairwise_iou(Boxes(reg), Boxes(gt_box))
        anchors = torch.cat([points, points], dim=1)  # the point as (x, y, x, y)
        return PointCandidates(
            im_inds=pos.im_inds, levels=pos.fpn_levels, ys=ys, xs=xs, anchors=anchors,
            strides=strides, gt_inds=pos.gt_inds,
            target_boxes=torch.stack([anchors, gt_box, reg], dim=1),
            box_ious=torch.stack([torch.full_like(reg_iou, -1.0), torch.ones_like(reg_iou), reg_iou], dim=1),
        )

    def losses(self, images: ImageList, features, fcos_outputs, gt_instances: List[Instances]) -> Dict[str, Tensor]:
        candidates = self.mask_candidates(fcos_outputs, gt_instances)
        return self.mask_branch.losses(fcos_outputs.bbox_towers, candidates, gt_instances)

    def inference(self, images: ImageList, features, fcos_outputs, detections: List[Instances]) -> List[Instances]:
        """Adds ``pred_masks`` (R, 1, 2K, 2K) box-relative probabilities to the detections."""
        towers = fcos_outputs.bbox_towers
        device = towers[0].device
        sizes = [tuple(t.shape[-2:]) for t in towers]
        im_inds = torch.cat([torch.full((len(d),), i, dtype=torch.long, device=device) for i, d in enumerate(detections)])
        levels = torch.cat([d.fpn_levels for d in detections])
        loc_inds = torch.cat([d.loc_inds for d in detections])
        points = torch.cat([d.locations for d in detections]).float()
        boxes = torch.cat([d.pred_boxes.tensor for d in detections])
        ys, xs = _cells(loc_inds, levels, sizes)
        masks = self.mask_branch.predict_points(
            towers, im_inds, levels, ys, xs, torch.cat([points, points], dim=1), self._strides_of(levels), boxes
        ).sigmoid()
        for d, m in zip(detections, masks.split([len(d) for d in detections])):
            d.pred_masks = m
        return detections
