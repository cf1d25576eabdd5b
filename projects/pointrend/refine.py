"""PointRend as a plug-in refinement head for detectors that predict image-level instance
masks (SparseInst here; any detector with per-instance mask logits on a regular grid).

Shape shorthand:
    B: images, Q: mask candidates per image (queries), M: matched instances (training)
    h, w: the detector's mask grid, Hp, Wp: padded input size, C: fine-grained channels
    P: points per instance

The point head (the paper's MLP; its "coarse prediction features" are the detector's own
mask logit, one channel) is trained on points inside each matched ground-truth box chosen
by the paper's biased sampler (k, beta) on the detector's mask, with binary cross-entropy
against the ground-truth mask. At inference the kept candidates' masks are refined by
adaptive subdivision from (h, w) up to the input resolution; the others are upsampled as
the detector would.
"""
import math
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from .point_head import build_pointrend_point_head
from .point_ops import point_sample
from .point_selection import box_points_to_image, regular_grid_points, sample_training_points
from .subdivision import instance_uncertainty, subdivide

__all__ = ["PointRendMaskRefiner", "masks_to_boxes_xyxy"]


def masks_to_boxes_xyxy(masks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(M, H, W) masks -> (M, 4) pixel boxes (x0, y0, x1, y1) around the nonzero pixels,
    scaled by ``scale`` about their centre and clipped to the image; empty masks give the
    whole image."""
    M, H, W = masks.shape
    boxes = masks.new_zeros((M, 4), dtype=torch.float32)
    boxes[:, 2], boxes[:, 3] = W, H
    fg = masks > 0.5
    rows, cols = fg.any(2), fg.any(1)
    for i in range(M):
        ys, xs = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        if len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    boxes = torch.cat((centre - half, centre + half), dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    return boxes


class PointRendMaskRefiner(nn.Module):
    """Point head + training sampler + subdivision for image-level instance masks."""

    @configurable
    def __init__(self, *, point_head: nn.Module, in_features: List[str], train_num_points: int = 196,
                 oversample_ratio: float = 3, importance_sample_ratio: float = 0.75,
                 subdivision_num_points: int = 784, subdivision_steps: int = -1, box_scale: float = 1.2):
        """
        Args:
            point_head: point head with 1 coarse channel and 1 output.
            in_features: fine-grained maps (e.g. "res2").
            subdivision_steps: 2x steps at inference; -1 = until the padded input size.
            box_scale: training points are drawn in the ground-truth box scaled by this.
        """
        super().__init__()
        self.point_head = point_head
        self.in_features = list(in_features)
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.subdivision_num_points = subdivision_num_points
        self.subdivision_steps = subdivision_steps
        self.box_scale = box_scale

    @classmethod
    def from_config(cls, cfg, input_shape):
        rf = cfg.MODEL.POINTREND.REFINE
        missing = [f for f in rf.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.POINTREND.REFINE.IN_FEATURES names {missing}; the backbone gives "
                             f"{sorted(input_shape)} (add them to MODEL.RESNETS.OUT_FEATURES)")
        channels = sum(input_shape[f].channels for f in rf.IN_FEATURES)
        return {
            "point_head": build_pointrend_point_head(cfg, channels, 1),
            "in_features": rf.IN_FEATURES,
            "train_num_points": rf.TRAIN_NUM_POINTS,
            "oversample_ratio": cfg.MODEL.POINTREND.OVERSAMPLE_RATIO,
            "importance_sample_ratio": cfg.MODEL.POINTREND.IMPORTANCE_SAMPLE_RATIO,
            "subdivision_num_points": rf.SUBDIVISION_NUM_POINTS,
            "subdivision_steps": rf.SUBDIVISION_STEPS,
            "box_scale": rf.BOX_SCALE,
        }

    def _fine(self, features: Dict[str, torch.Tensor], image: int, points: torch.Tensor) -> torch.Tensor:
        """(n, P, 2) image-normalised points of one image -> (n, C, P) features."""
        n, P, _ = points.shape
        outs = []
        for f in self.in_features:
            fmap = features[f][image : image + 1]
            outs.append(point_sample(fmap, points.reshape(1, n * P, 2))[0].view(-1, n, P).transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def losses(self, features, mask_logits, batch_idx, gt_masks):
        """
        Args:
            features: backbone maps (B, C, H/s, W/s) covering the padded input.
            mask_logits: (M, 1, h, w) the detector's logits of the matched candidates.
            batch_idx: (M,) image of each.
            gt_masks: (M, Hp, Wp) their ground-truth masks at the padded input size.

        Returns:
            {"loss_mask_point_refine": mean BCE at the sampled points}.
        """
        M = mask_logits.shape[0]
        if M == 0:
            return {"loss_mask_point_refine": sum(p.sum() for p in self.point_head.parameters()) * 0.0}
        Hp, Wp = gt_masks.shape[-2:]
        size = torch.tensor([Wp, Hp], dtype=mask_logits.dtype, device=mask_logits.device)
        coarse = mask_logits.detach()
        with torch.no_grad():
            boxes = masks_to_boxes_xyxy(gt_masks, self.box_scale).to(coarse)
            # the detector's mask inside each box, for the uncertainty-biased sampler
            grid = box_points_to_image(boxes, regular_grid_points(M, 14, coarse.device, coarse.dtype)) / size
            coarse_in_box = point_sample(coarse, grid).view(M, 1, 14, 14)
            pts = sample_training_points(coarse_in_box, instance_uncertainty, self.train_num_points,
                                         self.oversample_ratio, self.importance_sample_ratio)
            pts = box_points_to_image(boxes, pts) / size  # (M, P, 2) image-normalised
            labels = point_sample(gt_masks[:, None].to(coarse.dtype), pts)[:, 0]
        logits = torch.empty(M, 1, pts.shape[1], dtype=coarse.dtype, device=coarse.device)
        for b in torch.unique(batch_idx).tolist():
            sel = torch.nonzero(batch_idx == b).flatten()
            logits[sel] = self.point_head(self._fine(features, b, pts[sel]), point_sample(coarse[sel], pts[sel]))
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], labels, reduction="mean")
        return {"loss_mask_point_refine": loss}

    @torch.no_grad()
    def refine(self, features, mask_logits: torch.Tensor, keep: torch.Tensor, out_size):
        """
        Args:
            features: backbone maps (B, C, H/s, W/s).
            mask_logits: (B, Q, h, w) the detector's mask logits.
            keep: (B, Q) bool, candidates to refine (the others are only upsampled).
            out_size: (Hp, Wp) padded input size.

        Returns:
            (B, Q, H', W') logits, H' = h * 2**steps (= Hp with the default steps).
        """
        B, Q, h, w = mask_logits.shape
        steps = self.subdivision_steps
        if steps < 0:
            steps = max(0, math.ceil(math.log2(max(out_size[0] / h, out_size[1] / w))))
        out = F.interpolate(mask_logits, scale_factor=2 ** steps, mode="bilinear", align_corners=False)
        for b in range(B):
            sel = torch.nonzero(keep[b]).flatten()
            if len(sel) == 0:
                continue
            coarse = mask_logits[b, sel][:, None]  # (n, 1, h, w)
            # The point head is trained on points inside the (scaled) ground-truth box only, so
            # at inference it re-predicts only inside the (scaled) box of the detector's own mask:
            # elsewhere its output is out of distribution and stray positives would inflate the
            # mask (and the box derived from it). An empty coarse mask stays as it is.
            fg = coarse[:, 0] > 0
            region = masks_to_boxes_xyxy(fg.float(), self.box_scale).to(coarse)
            region[~fg.flatten(1).any(1)] = 0.0
            region = region / torch.tensor([w, h, w, h], dtype=coarse.dtype, device=coarse.device)

            def inside(points, region=region):
                x, y = points[..., 0], points[..., 1]
                return ((x >= region[:, None, 0]) & (x <= region[:, None, 2])
                        & (y >= region[:, None, 1]) & (y <= region[:, None, 3]))

            def uncertainty(logits, region=region):
                H, W = logits.shape[-2:]
                ys = (torch.arange(H, device=logits.device, dtype=logits.dtype) + 0.5) / H
                xs = (torch.arange(W, device=logits.device, dtype=logits.dtype) + 0.5) / W
                grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).view(1, H * W, 2)
                ok = inside(grid.expand(logits.shape[0], -1, -1)).view(-1, 1, H, W)
                # cells outside the region come last (finite, so top-k stays well defined)
                return instance_uncertainty(logits) - (~ok).to(logits.dtype) * 1e4

            def predict(points, coarse=coarse, b=b):
                from_coarse = point_sample(coarse, points)
                head = self.point_head(self._fine(features, b, points), from_coarse)
                return torch.where(inside(points)[:, None], head, from_coarse)

            out[b, sel] = subdivide(coarse, predict, steps, self.subdivision_num_points, uncertainty)[:, 0]
        return out


def _register_sparseinst_variant():
    """``D2SegPointRendSparseInst``: SparseInst with PointRend's refinement head."""
    try:
        from d2seg.sparseinst import SparseInst
        from d2seg.sparseinst.matcher import image_extents
        from d2seg.sparseinst.sparseinst import rescored_probabilities
    except ImportError:  # pragma: no cover - SparseInst not in this checkout
        return None
    from detectron2.structures import BitMasks

    @META_ARCH_REGISTRY.register()
    class D2SegPointRendSparseInst(SparseInst):
        """SparseInst whose masks are refined by PointRend (MODEL.POINTREND.REFINE)."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.refiner = PointRendMaskRefiner(cfg, self.backbone.output_shape())
            self.to(self.device)

        def forward(self, batched_inputs):
            images = self.preprocess_image(batched_inputs)
            feats = self.backbone(images.tensor)
            extents = image_extents(images.image_sizes, images.tensor.shape[-2:])
            outputs = self.decoder(self.encoder(feats), extents)
            fine = {f: feats[f] for f in self.refiner.in_features}
            if not self.training:
                probs = rescored_probabilities(outputs["pred_logits"], outputs["pred_scores"])
                keep = probs.max(dim=-1).values > self.cls_threshold
                outputs = dict(outputs)
                outputs["pred_masks"] = self.refiner.refine(fine, outputs["pred_masks"], keep,
                                                            images.tensor.shape[-2:])
                return self.inference(outputs, batched_inputs, images)
            instances = [x["instances"] for x in batched_inputs]
            gt_classes, gt_masks = self.prepare_targets(instances, images.tensor.shape[-2:],
                                                        outputs["pred_masks"].shape[-2:])
            losses = self.criterion(outputs, gt_classes, gt_masks, extents)
            # the same matching as the criterion's, to train the refiner on matched pairs
            flat = outputs["pred_masks"].flatten(2)
            Hp, Wp = images.tensor.shape[-2:]
            m_logits, m_batch, m_gt = [], [], []
            for i, inst in enumerate(instances):
                rows, cols = self.criterion.matcher(outputs["pred_logits"][i], flat[i], gt_classes[i].to(flat.device),
                                                    gt_masks[i].to(flat).flatten(1),
                                                    mask_hw=outputs["pred_masks"].shape[-2:], extent=extents[i])
                if len(rows) == 0:
                    continue
                gm = inst.gt_masks
                if not isinstance(gm, BitMasks):
                    gm = BitMasks.from_polygon_masks(gm.polygons, *inst.image_size)
                full = gm.tensor.to(flat.device, torch.float32)
                padded = full.new_zeros(full.shape[0], Hp, Wp)
                padded[:, : full.shape[1], : full.shape[2]] = full
                m_logits.append(outputs["pred_masks"][i, rows.to(flat.device)][:, None])
                m_batch.append(torch.full((len(rows),), i, dtype=torch.long, device=flat.device))
                m_gt.append(padded[cols.to(flat.device)])
            if m_logits:
                losses.update(self.refiner.losses(fine, torch.cat(m_logits), torch.cat(m_batch), torch.cat(m_gt)))
            else:
                losses.update(self.refiner.losses(fine, flat.new_zeros(0, 1, 1, 1), None, None))
            return losses

    return D2SegPointRendSparseInst


D2SegPointRendSparseInst = _register_sparseinst_variant()
