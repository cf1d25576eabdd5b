"""The PointINS mask branch, shared by the RetinaNet and FCOS variants (paper Fig. 4).

Shape shorthand in this module:
    N: images, C: channels of the regression tower, L: levels, Hl, Wl: size of level l,
    R: points (with one anchor and one target box each) to segment,
    E: template channels, K: template side, B: filters of the instance-aware convolution,
    d: its kernel size (D = d * d), U: length of I^z, k: kernel of the up-scaling conv,
    M = 2K: side of the predicted mask, P: candidate points, T = 3 target box types

Per point, from the last feature map of the detector's regression (box) tower:
  1. instance-agnostic template: the channel up-scaling convolution (C -> K*K*E, kernel
     k x k) evaluated only at the point, from its k x k neighbourhood, and reshaped to
     (E, K, K) with E innermost (the first E channels belong to the top-left template
     pixel);
  2. instance-aware weights: ReLU(FC(I^z)) reshaped to (B, E, d, d);
  3. instance-aware convolution (d2seg.layers.instance_aware_conv) -> (B, K, K);
  4. Mask R-CNN's mask head (Detectron2's MaskRCNNConvUpsampleHead, class-agnostic)
     -> (1, 2K, 2K) mask logits relative to the target box.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from d2seg.layers import instance_aware_conv

from .config import INSTANCE_INFO_PARTS
from .instance_info import check_instance_info_parts, instance_info, instance_info_size
from .losses import edge_weighted_bce, mask_targets
from .sampling import check_sample_ratios, sample_positive_pairs

__all__ = ["PointCandidates", "gather_patches", "PointINSMaskBranch"]


@dataclass
class PointCandidates:
    """Candidate points of a batch for mask training (P rows), built by a variant.

    Attributes:
        im_inds (P,): image index; levels (P,): level index; ys, xs (P,): cell on the level.
        anchors (P, 4): XYXY anchor box (anchor-free: the point as (x, y, x, y)).
        strides (P,): stride of the level.
        gt_inds (P,): matched ground-truth instance in the image.
        target_boxes (P, T, 4): XYXY target boxes of the types (anchor, GT, regressed).
        box_ious (P, T): IoU of each target box with the GT (negative: type unavailable).
    """

    im_inds: Tensor
    levels: Tensor
    ys: Tensor
    xs: Tensor
    anchors: Tensor
    strides: Tensor
    gt_inds: Tensor
    target_boxes: Tensor
    box_ious: Tensor

    @staticmethod
    def cat(parts: List["PointCandidates"]) -> "PointCandidates":
        return PointCandidates(*[torch.cat([getattr(p, f) for p in parts]) for f in PointCandidates.__dataclass_fields__])


def gather_patches(feature: Tensor, im_inds: Tensor, ys: Tensor, xs: Tensor, k: int) -> Tensor:
    """The k x k neighbourhoods (zero padded, like a 'same' convolution) of R cells.

    Args:
        feature: (N, C, H, W).
        im_inds, ys, xs: (R,) image index and cell (row, column).
        k: odd neighbourhood size.
    Returns:
        (R, C, k, k).
    """
    p = k // 2
    padded = F.pad(feature, (p, p, p, p))
    offs = torch.arange(k, device=feature.device)
    yy = (ys[:, None] + offs)[:, :, None]  # (R, k, 1) in padded coordinates
    xx = (xs[:, None] + offs)[:, None, :]  # (R, 1, k)
    patches = padded[im_inds[:, None, None], :, yy, xx]  # (R, k, k, C)
    return patches.permute(0, 3, 1, 2)


class PointINSMaskBranch(nn.Module):
    """Templates, instance-aware weights, instance-aware convolution and mask head, plus
    the positive sampling and the loss of training.

    Parameters: ``upscale`` (the channel up-scaling Conv2d; applied at points through its
    weights), ``instance_aware_weights`` (Linear U -> B*E*d*d, then ReLU), ``mask_head``
    (Detectron2 MaskRCNNConvUpsampleHead, 1 class).
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        anchor_free: bool,
        template_channels: int = 9,
        template_size: int = 16,
        upscale_kernel_size: int = 3,
        num_filters: int = 256,
        dynamic_kernel_size: int = 1,
        instance_info_parts: Sequence[str] = INSTANCE_INFO_PARTS,
        mask_head_num_conv: int = 4,
        mask_head_conv_dim: int = 256,
        mask_head_norm: str = "",
        anchor_iou_thresh: float = 0.5,
        box_iou_thresh: float = 0.5,
        num_samples: int = 128,
        sample_ratios: Sequence[float] = (0.05, 0.05, 0.9),
        mask_loss_weight: float = 2.0,
        edge_weight: float = 4.0,
    ):
        """
        Args:
            in_channels: C.
            anchor_free: FCOS (I^o = {1/s}) rather than RetinaNet.
            template_channels, template_size: E and K.
            upscale_kernel_size: k (odd).
            num_filters, dynamic_kernel_size: B and d (odd).
            instance_info_parts: parts of I^z; empty: the FC reads the point's feature.
            mask_head_*: Mask R-CNN mask head (convs, their width, "" or "GN").
            anchor_iou_thresh, box_iou_thresh, num_samples, sample_ratios: sampling
                (see sampling.py; the anchor threshold is applied by the variant).
            mask_loss_weight: lambda_mask; edge_weight: BCE weight of edge pixels.
        """
        super().__init__()
        for name, v in [("UPSCALE_KERNEL_SIZE", upscale_kernel_size), ("DYNAMIC_KERNEL_SIZE", dynamic_kernel_size)]:
            if v < 1 or v % 2 != 1:
                raise ValueError(f"MODEL.POINTINS.{name} must be odd and >= 1, got {v}.")
        if dynamic_kernel_size > 7:
            raise ValueError(f"MODEL.POINTINS.DYNAMIC_KERNEL_SIZE must be <= 7, got {dynamic_kernel_size}.")
        for name, v in [("TEMPLATE_CHANNELS", template_channels), ("TEMPLATE_SIZE", template_size),
                        ("NUM_FILTERS", num_filters), ("MASK_HEAD.CONV_DIM", mask_head_conv_dim)]:
            if v < 1:
                raise ValueError(f"MODEL.POINTINS.{name} must be >= 1, got {v}.")
        self.anchor_free = bool(anchor_free)
        self.E, self.K, self.B = int(template_channels), int(template_size), int(num_filters)
        self.d, self.k = int(dynamic_kernel_size), int(upscale_kernel_size)
        self.instance_info_parts = check_instance_info_parts(instance_info_parts)
        self.anchor_iou_thresh = float(anchor_iou_thresh)
        self.box_iou_thresh = float(box_iou_thresh)
        self.num_samples = int(num_samples)
        self.sample_ratios = check_sample_ratios(sample_ratios)
        self.mask_loss_weight = float(mask_loss_weight)
        self.edge_weight = float(edge_weight)

        self.upscale = nn.Conv2d(in_channels, self.K * self.K * self.E, self.k, padding=self.k // 2)
        nn.init.kaiming_normal_(self.upscale.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.upscale.bias)
        if self.instance_info_parts:
            u = instance_info_size(self.instance_info_parts, self.anchor_free)
        else:
            u = in_channels
        self.instance_aware_weights = nn.Sequential(nn.Linear(u, self.B * self.E * self.d * self.d), nn.ReLU())
        self.mask_head = MaskRCNNConvUpsampleHead(
            ShapeSpec(channels=self.B, height=self.K, width=self.K),
            num_classes=1,
            conv_dims=[mask_head_conv_dim] * (mask_head_num_conv + 1),
            conv_norm=mask_head_norm,
        )

    @classmethod
    def from_config(cls, cfg, in_channels: int, anchor_free: bool):
        p = cfg.MODEL.POINTINS
        return {
            "in_channels": in_channels,
            "anchor_free": anchor_free,
            "template_channels": p.TEMPLATE_CHANNELS,
            "template_size": p.TEMPLATE_SIZE,
            "upscale_kernel_size": p.UPSCALE_KERNEL_SIZE,
            "num_filters": p.NUM_FILTERS,
            "dynamic_kernel_size": p.DYNAMIC_KERNEL_SIZE,
            "instance_info_parts": p.INSTANCE_INFO,
            "mask_head_num_conv": p.MASK_HEAD.NUM_CONV,
            "mask_head_conv_dim": p.MASK_HEAD.CONV_DIM,
            "mask_head_norm": p.MASK_HEAD.NORM,
            "anchor_iou_thresh": p.ANCHOR_IOU_THRESH,
            "box_iou_thresh": p.BOX_IOU_THRESH,
            "num_samples": p.NUM_SAMPLES,
            "sample_ratios": p.SAMPLE_RATIOS,
            "mask_loss_weight": p.MASK_LOSS_WEIGHT,
            "edge_weight": p.EDGE_WEIGHT,
        }

    @property
    def mask_size(self) -> int:
        """M = 2K."""
        return 2 * self.K

    # ---------------------------------------------------------------- network pieces
    def _to_template(self, flat: Tensor) -> Tensor:
        """(R, K*K*E) with E innermost -> (R, E, K, K)."""
        return flat.reshape(-1, self.K, self.K, self.E).permute(0, 3, 1, 2)

    def dense_templates(self, feature: Tensor) -> Tensor:
        """Templates at every cell of one level (the dense computation, used to check the
        point-wise one): (N, C, H, W) -> (N, H, W, E, K, K)."""
        y = self.upscale(feature)  # (N, K*K*E, H, W)
        n, _, h, w = y.shape
        return self._to_template(y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])).reshape(n, h, w, self.E, self.K, self.K)

    def templates_at_points(self, towers: List[Tensor], im_inds: Tensor, levels: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
        """The up-scaling convolution evaluated only at R points, from their k x k
        neighbourhoods.

        Args:
            towers: L tensors (N, C, Hl, Wl), the last regression-tower maps.
            im_inds, levels, ys, xs: (R,) image, level and cell of each point.
        Returns:
            (R, E, K, K).
        """
        weight = self.upscale.weight.flatten(1)  # (K*K*E, C*k*k)
        out, order = [], []
        for lvl, feat in enumerate(towers):
            sel = (levels == lvl).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            patches = gather_patches(feat, im_inds[sel], ys[sel], xs[sel], self.k)
            out.append(F.linear(patches.flatten(1), weight, self.upscale.bias))
            order.append(sel)
        if not out:
            return towers[0].new_zeros((0, self.E, self.K, self.K)) + weight.sum() * 0
        flat = torch.cat(out)[torch.argsort(torch.cat(order))]
        return self._to_template(flat)

    def features_at_points(self, towers: List[Tensor], im_inds: Tensor, levels: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
        """(R, C) tower features at the points (I^z "from the feature map")."""
        out = towers[0].new_zeros((len(im_inds), towers[0].shape[1]))
        for lvl, feat in enumerate(towers):
            sel = (levels == lvl).nonzero(as_tuple=True)[0]
            if len(sel):
                out = out.index_put((sel,), feat[im_inds[sel], :, ys[sel], xs[sel]])
        return out

    def weights_from_info(self, info: Tensor) -> Tensor:
        """Instance-aware weights ReLU(FC(I^z)): (R, U) -> (R, B, E, d, d)."""
        return self.instance_aware_weights(info).reshape(-1, self.B, self.E, self.d, self.d)

    def forward(self, templates: Tensor, info: Tensor) -> Tensor:
        """Mask logits of R points.

        Args:
            templates: (R, E, K, K) instance-agnostic templates.
            info: (R, U) instance information I^z (or point features).
        Returns:
            (R, 1, M, M) logits relative to each point's target box.
        """
        feats = instance_aware_conv(templates, self.weights_from_info(info).to(templates.dtype))
        return self.mask_head.layers(feats)

    def predict_points(self, towers, im_inds, levels, ys, xs, anchors, strides, boxes) -> Tensor:
        """Mask logits (R, 1, M, M) of R points, each with its anchor (R, 4), stride (R,)
        and target box (R, 4) (at inference: the detected box)."""
        templates = self.templates_at_points(towers, im_inds, levels, ys, xs)
        if self.instance_info_parts:
            info = instance_info(anchors, boxes, strides, self.instance_info_parts, self.anchor_free)
        else:
            info = self.features_at_points(towers, im_inds, levels, ys, xs)
        return self(templates, info.to(templates.dtype))

    # ---------------------------------------------------------------- training
    def losses(self, towers: List[Tensor], candidates: PointCandidates, gt_instances: List[Instances]) -> Dict[str, Tensor]:
        """{"loss_mask": lambda_mask x edge-weighted BCE} on the sampled positives.

        Args:
            towers: L tensors (N, C, Hl, Wl), the last regression-tower maps.
            candidates: the P candidate points of the batch (anchor condition passed).
            gt_instances: N Instances with gt_masks.
        """
        cand, types = sample_positive_pairs(
            candidates.box_ious, self.box_iou_thresh, self.sample_ratios, self.num_samples
        )
        try:
            storage = get_event_storage()
            storage.put_scalar("pointins/num_candidates", float(len(candidates.im_inds)))
            storage.put_scalar("pointins/num_sampled", float(len(cand)))
            for t, name in enumerate(("anchor", "gt", "regressed")):
                storage.put_scalar(f"pointins/sampled_{name}", float((types == t).sum()))
        except AssertionError:  # no EventStorage outside the trainer
            pass
        im_inds = candidates.im_inds[cand]
        boxes = candidates.target_boxes[cand, types]
        logits = self.predict_points(
            towers, im_inds, candidates.levels[cand], candidates.ys[cand], candidates.xs[cand],
            candidates.anchors[cand], candidates.strides[cand], boxes,
        )
        with torch.no_grad():
            targets = mask_targets(gt_instances, im_inds, candidates.gt_inds[cand], boxes, self.mask_size)
        loss = edge_weighted_bce(logits[:, 0], targets.to(logits.dtype), self.edge_weight)
        if len(cand) == 0:  # keep every parameter in the graph
            loss = loss + sum(p.sum() for p in self.parameters()) * 0.0
        return {"loss_mask": self.mask_loss_weight * loss}
