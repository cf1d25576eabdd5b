"""PointINS on Detectron2's RetinaNet (A anchors per location; A = 9 by default).

Shape shorthand in this module:
    N: images, L: levels, Hl, Wl: size of level l, A: anchors per location,
    Ml = Hl * Wl * A anchors of level l, M = sum_l Ml, K: classes, G: instances of an image,
    P: candidate anchors of the batch, R: detections of an image

``PointINSRetinaNet`` (META_ARCH_REGISTRY) is Detectron2's RetinaNet whose head also
returns the last feature map of its regression subnet (``bbox_subnet``), plus the PointINS
mask branch on that map. Parameter names of the detector are Detectron2's, so RetinaNet
checkpoints load (the mask branch starts fresh).

Training: RetinaNet's losses + ``loss_mask`` on positives sampled among the anchors whose
IoU with their best GT exceeds MODEL.POINTINS.ANCHOR_IOU_THRESH, paired with the anchor,
the GT or the regressed box (detached) as target box. Inference: RetinaNet's detections
(score threshold, top-k, NMS, at most TEST.DETECTIONS_PER_IMAGE), then masks for those
only (the paper's second strategy), each from its own anchor and detected box.
"""
from typing import List, Optional

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.structures.boxes import matched_pairwise_iou

from .mask_branch import PointCandidates, PointINSMaskBranch

__all__ = ["PointINSRetinaNetHead", "PointINSRetinaNet"]


class PointINSRetinaNetHead(RetinaNetHead):
    """RetinaNetHead that also returns the regression subnet's last feature maps."""

    def forward(self, features: List[Tensor]):
        """
        Args:
            features: L tensors (N, C, Hl, Wl).
        Returns:
            [logits (N, A*K, Hl, Wl), bbox_reg (N, A*4, Hl, Wl), bbox_towers (N, C, Hl, Wl)],
            each a list over levels.
        """
        logits, bbox_reg, towers = [], [], []
        for feature in features:
            logits.append(self.cls_score(self.cls_subnet(feature)))
            t = self.bbox_subnet(feature)
            towers.append(t)
            bbox_reg.append(self.bbox_pred(t))
        return [logits, bbox_reg, towers]


@META_ARCH_REGISTRY.register()
class PointINSRetinaNet(RetinaNet):
    """RetinaNet + the PointINS mask branch (attribute ``mask_branch``)."""

    @configurable
    def __init__(self, *, mask_branch: PointINSMaskBranch, strides: List[int], anchor_condition: str = "IOU",
                 **kwargs):
        """
        Args:
            mask_branch: the PointINS branch (anchor-based).
            strides: L strides of ``head_in_features``.
            anchor_condition: "IOU" (IoU(anchor, best GT) > the branch's anchor_iou_thresh)
                or "DETECTOR" (RetinaNet's own box-training positives).
            kwargs: RetinaNet's arguments; ``head`` must return the towers as well
                (:class:`PointINSRetinaNetHead`).
        """
        super().__init__(**kwargs)
        if mask_branch.anchor_free:
            raise ValueError("PointINSRetinaNet needs an anchor-based mask branch (anchor_free=False).")
        if anchor_condition not in ("IOU", "DETECTOR"):
            raise ValueError(f"MODEL.POINTINS.ANCHOR_CONDITION must be 'IOU' or 'DETECTOR', got {anchor_condition!r}.")
        self.anchor_condition = anchor_condition
        self.mask_branch = mask_branch
        self.strides = [int(s) for s in strides]

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        shapes = ret["backbone"].output_shape()
        feature_shapes = [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        channels = {s.channels for s in feature_shapes}
        if len(channels) != 1:
            raise ValueError(f"PointINSRetinaNet: MODEL.RETINANET.IN_FEATURES must have equal channels, got {channels}.")
        ret["head"] = PointINSRetinaNetHead(cfg, feature_shapes)
        ret["strides"] = [s.stride for s in feature_shapes]
        ret["mask_branch"] = PointINSMaskBranch(cfg, in_channels=channels.pop(), anchor_free=False)
        ret["anchor_condition"] = cfg.MODEL.POINTINS.ANCHOR_CONDITION.upper()
        return ret

    # ------------------------------------------------------------------ helpers
    def _anchor_cells(self, features: List[Tensor]):
        """Per anchor of the concatenated (M,) order: level, row, column, stride."""
        A = self.anchor_generator.num_cell_anchors[0]
        levels, ys, xs, strides = [], [], [], []
        device = features[0].device
        for lvl, f in enumerate(features):
            h, w = f.shape[-2:]
            idx = torch.arange(h * w * A, device=device) // A  # location of each anchor
            levels.append(torch.full_like(idx, lvl))
            ys.append(idx // w)
            xs.append(idx % w)
            strides.append(torch.full((len(idx),), float(self.strides[lvl]), device=device))
        return torch.cat(levels), torch.cat(ys), torch.cat(xs), torch.cat(strides)

    def mask_candidates(self, images: ImageList, features, anchors: List[Boxes], pred_deltas: List[Tensor],
                        gt_instances: List[Instances], gt_labels: Optional[List[Tensor]] = None) -> PointCandidates:
        """Anchors that pass the anchor condition, with their three target boxes: IoU(anchor,
        best GT) > ANCHOR_IOU_THRESH, or with ANCHOR_CONDITION "DETECTOR" the foreground
        anchors of ``gt_labels`` (N tensors (M,) from ``label_anchors``)."""
        all_anchors = Boxes.cat(anchors).tensor  # (M, 4)
        levels, ys, xs, strides = self._anchor_cells(features)
        deltas = torch.cat(pred_deltas, dim=1).detach()  # (N, M, 4)
        parts = []
        for i, gt in enumerate(gt_instances):
            if len(gt) == 0:
                continue
            iou = pairwise_iou(gt.gt_boxes, Boxes(all_anchors))  # (G, M)
            best, gt_inds = iou.max(dim=0)  # the matcher's matched GT, too
            if self.anchor_condition == "DETECTOR":
                if gt_labels is None:
                    raise ValueError("ANCHOR_CONDITION 'DETECTOR' needs the anchors' gt_labels.")
                fg = (gt_labels[i] >= 0) & (gt_labels[i] != self.num_classes)
            else:
                fg = best > self.mask_branch.anchor_iou_thresh
            sel = fg.nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            anc = all_anchors[sel]
            gt_box = gt.gt_boxes.tensor[gt_inds[sel]]
            reg = Boxes(self.box2box_transform.apply_deltas(deltas[i, sel], anc))
            reg.clip(images.image_sizes[i])
            reg_iou = matched_pairwise_iou(reg, Boxes(gt_box))
            parts.append(PointCandidates(
                im_inds=torch.full_like(sel, i), levels=levels[sel], ys=ys[sel], xs=xs[sel],
                anchors=anc, strides=strides[sel], gt_inds=gt_inds[sel],
                target_boxes=torch.stack([anc, gt_box, reg.tensor], dim=1),
                box_ious=torch.stack([best[sel], torch.ones_like(reg_iou), reg_iou], dim=1),
            ))
        if not parts:
            z = all_anchors.new_zeros((0,), dtype=torch.long)
            return PointCandidates(z, z, z, z, all_anchors[:0], all_anchors.new_zeros(0), z,
                                   all_anchors.new_zeros((0, 3, 4)), all_anchors.new_zeros((0, 3)))
        return PointCandidates.cat(parts)

    # ------------------------------------------------------------------ training / inference
    def forward_training(self, images, features, predictions, gt_instances):
        logits, bbox_reg, towers = predictions
        pred_logits, pred_deltas = self._transpose_dense_predictions([logits, bbox_reg], [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
        candidates = self.mask_candidates(images, features, anchors, pred_deltas, gt_instances, gt_labels)
        losses.update(self.mask_branch.losses(towers, candidates, gt_instances))
        return losses

    def forward_inference(self, images: ImageList, features: List[Tensor], predictions):
        logits, bbox_reg, towers = predictions
        pred_logits, pred_deltas = self._transpose_dense_predictions([logits, bbox_reg], [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        all_anchors = Boxes.cat(anchors).tensor
        levels, ys, xs, strides = self._anchor_cells(features)
        offsets = [0]
        for a in anchors[:-1]:
            offsets.append(offsets[-1] + len(a))

        results = []
        for i, image_size in enumerate(images.image_sizes):
            det = self.detect_single_image(
                anchors, offsets, [x[i].sigmoid() for x in pred_logits], [x[i] for x in pred_deltas], image_size
            )
            det.pred_boxes.clip(image_size)
            results.append(det)
        # Masks of all detections of the batch at once.
        im_inds = torch.cat([torch.full((len(r),), i, dtype=torch.long, device=self.device) for i, r in enumerate(results)])
        inds = torch.cat([r.anchor_inds for r in results])
        boxes = torch.cat([r.pred_boxes.tensor for r in results])
        masks = self.mask_branch.predict_points(
            towers, im_inds, levels[inds], ys[inds], xs[inds], all_anchors[inds], strides[inds], boxes
        ).sigmoid()
        for r, m in zip(results, masks.split([len(r) for r in results])):
            r.pred_masks = m
            r.remove("anchor_inds")
        return results

    def detect_single_image(self, anchors: List[Boxes], offsets: List[int], box_cls: List[Tensor],
                            box_delta: List[Tensor], image_size) -> Instances:
        """RetinaNet's single-image inference (threshold, per-level top-k, class-aware NMS,
        at most ``max_detections_per_image``) that also keeps each detection's anchor index
        ``anchor_inds`` (into the concatenated M anchors).

        Args:
            anchors: L Boxes (Ml anchors); offsets: L start indices of the levels in M.
            box_cls: L tensors (Ml, K) probabilities; box_delta: L tensors (Ml, 4).
        """
        per_level = []
        for anc, off, scores, deltas in zip(anchors, offsets, box_cls, box_delta):
            keep = scores > self.test_score_thresh
            cand_scores = scores[keep]
            idxs = keep.nonzero()  # (C, 2): anchor, class
            num = min(idxs.shape[0], self.test_topk_candidates)
            cand_scores, top = cand_scores.topk(num)
            idxs = idxs[top]
            anchor_idx, cls_idx = idxs.unbind(dim=1)
            boxes = self.box2box_transform.apply_deltas(deltas[anchor_idx], anc.tensor[anchor_idx])
            per_level.append(Instances(image_size, pred_boxes=Boxes(boxes), scores=cand_scores,
                                       pred_classes=cls_idx, anchor_inds=anchor_idx + off))
        pred = Instances.cat(per_level)
        keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh)
        return pred[keep[: self.max_detections_per_image]]
