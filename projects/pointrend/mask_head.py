"""PointRend as the mask head of Mask R-CNN (paper, sections 3 and 4).

Shape shorthand:
    B: images, R: regions (proposals in training, detections at inference) over all images
    C: channels of a feature map, K: classes, M: coarse mask side (7)
    S: pooled side of the coarse head's input (14), P: points per region

Training: coarse (R, K, M, M) logits from :class:`PointRendCoarseMaskHead` on a regular
S x S grid of P2 features inside each proposal (Mask R-CNN's mask loss on them), plus the
point head on TRAIN_NUM_POINTS points per region chosen by the biased sampler (k, beta),
trained with binary cross-entropy against the ground-truth mask at those points.

Inference: the point head predicts the detected class on a regular grid, then adaptive
subdivision refines it to (M * 2**SUBDIVISION_STEPS)^2, re-predicting the
SUBDIVISION_NUM_POINTS most uncertain cells per step. Only the detected class's channel
is carried through the subdivision (the other K-1 would be thrown away by Mask R-CNN's
inference), and with many points per image the point head's first layer is applied to
the P2 map once and sampled afterwards (same values, see point_head.py).
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference, mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from .coarse_head import PointRendCoarseMaskHead
from .point_head import build_pointrend_point_head
from .point_ops import point_sample, point_sample_per_image
from .point_selection import box_points_to_image, regular_grid_points, sample_training_points
from .subdivision import instance_uncertainty, subdivide, subdivision_steps_for

__all__ = ["D2SegPointRendMaskHead", "point_labels_from_masks", "instance_point_loss"]

logger = logging.getLogger(__name__)


def _class_channel(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, K, ...) -> (R, 1, ...) the channel of each region's class (as is if K = 1)."""
    if logits.shape[1] == 1:
        return logits
    return logits[torch.arange(logits.shape[0], device=logits.device), classes].unsqueeze(1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(R, C, P) -> (C, R*P) channel-first matrix."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def point_labels_from_masks(instances: List[Instances], points_in_image: torch.Tensor) -> torch.Tensor:
    """
    Ground-truth mask values at points, bilinearly interpolated from the bit masks (so
    points on a boundary get fractional targets).

    Args:
        instances: B Instances with ``gt_masks`` (BitMasks), R regions in all.
        points_in_image: (R, P, 2) points in pixels (x, y).

    Returns:
        (R, P) targets in [0, 1].
    """
    labels = []
    for inst, pts in zip(instances, torch.split(points_in_image, [len(x) for x in instances])):
        if len(inst) == 0:
            continue
        if not isinstance(inst.gt_masks, BitMasks):
            raise TypeError(
                "PointRend's point loss needs bit masks: set INPUT.MASK_FORMAT to 'bitmask' "
                f"(got {type(inst.gt_masks).__name__})"
            )
        masks = inst.gt_masks.tensor
        h, w = masks.shape[-2:]
        size = torch.tensor([w, h], dtype=pts.dtype, device=pts.device)
        labels.append(point_sample(masks.unsqueeze(1).to(pts.dtype), pts / size).squeeze(1))
    if not labels:
        return points_in_image.new_zeros(points_in_image.shape[:2])
    return cat(labels, dim=0)


def instance_point_loss(point_logits: torch.Tensor, gt_classes: torch.Tensor, labels: torch.Tensor):
    """
    Mean binary cross-entropy of each region's ground-truth class at its points.

    Args:
        point_logits: (R, K, P) or (R, 1, P) logits.
        gt_classes: (R,) long.
        labels: (R, P) targets in [0, 1].
    """
    if point_logits.shape[0] == 0:
        return point_logits.sum() * 0.0
    logits = _class_channel(point_logits, gt_classes)[:, 0]
    try:
        acc = ((logits > 0) == (labels > 0.5)).float().mean().item()
        get_event_storage().put_scalar("pointrend/point_accuracy", acc)
    except AssertionError:  # no EventStorage outside a trainer
        pass
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="mean")


@ROI_MASK_HEAD_REGISTRY.register()
class D2SegPointRendMaskHead(nn.Module):
    """PointRend mask head; give it the features as a dict (ROI_MASK_HEAD.POOLER_TYPE: "")."""

    @configurable
    def __init__(
        self,
        *,
        feature_strides: Dict[str, int],
        coarse_in_features: List[str],
        pooler_resolution: int,
        coarse_head: nn.Module,
        point_in_features: List[str],
        point_head: Optional[nn.Module],
        train_num_points: int = 14 * 14,
        oversample_ratio: float = 3,
        importance_sample_ratio: float = 0.75,
        subdivision_steps: int = 5,
        subdivision_num_points: int = 28 * 28,
        coarse_side: int = 7,
        project_fine_features: str = "auto",
    ):
        """
        Args:
            feature_strides: stride of each feature map name.
            coarse_in_features: maps pooled (concatenated) for the coarse head (P2).
            pooler_resolution: S.
            coarse_head: (R, C, S, S) -> (R, K, M, M) logits.
            point_in_features: fine-grained maps of the point head (P2); None point_head
                gives the coarse head alone (the paper's "no PointRend" ablation).
            point_head: a point head (:class:`PointRendMLPPointHead`).
            train_num_points, oversample_ratio, importance_sample_ratio: N, k, beta.
            subdivision_steps, subdivision_num_points: steps and N at inference.
            coarse_side: M, the side subdivision starts from.
            project_fine_features: "auto" | "always" | "never": apply the point head's
                first layer to the P2 map before sampling at inference ("auto": when
                there are more points to predict than map positions).
        """
        super().__init__()
        if project_fine_features not in ("auto", "always", "never"):
            raise ValueError(
                "POINTREND.PROJECT_FINE_FEATURES must be 'auto', 'always' or 'never', "
                f"got {project_fine_features!r}"
            )
        self.feature_strides = dict(feature_strides)
        self.coarse_in_features = list(coarse_in_features)
        self.pooler_resolution = pooler_resolution
        self.coarse_head = coarse_head
        self.point_in_features = list(point_in_features)
        self.point_head = point_head
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.init_side, self.subdivision_steps = subdivision_steps_for(
            coarse_side, subdivision_steps, subdivision_num_points
        )
        self.subdivision_num_points = subdivision_num_points
        self.project_fine_features = project_fine_features

    @classmethod
    def from_config(cls, cfg, input_shape):
        if not isinstance(input_shape, dict):
            raise ValueError(
                "D2SegPointRendMaskHead pools its own features: use ROI_HEADS.NAME "
                "'D2SegPointRendROIHeads' or set ROI_MASK_HEAD.POOLER_TYPE to ''"
            )
        pr = cfg.MODEL.POINTREND
        for key, names in (("COARSE_HEAD.IN_FEATURES", pr.COARSE_HEAD.IN_FEATURES),
                           ("IN_FEATURES", pr.IN_FEATURES)):
            missing = [f for f in names if f not in input_shape]
            if missing:
                raise ValueError(
                    f"MODEL.POINTREND.{key} names {missing}, which ROI_HEADS.IN_FEATURES does not "
                    f"provide (available: {sorted(input_shape)})"
                )
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        coarse_classes = 1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else num_classes
        coarse_channels = sum(input_shape[f].channels for f in pr.COARSE_HEAD.IN_FEATURES)
        point_head = None
        if pr.POINT_HEAD_ON:
            point_channels = sum(input_shape[f].channels for f in pr.IN_FEATURES)
            point_head = build_pointrend_point_head(cfg, point_channels, coarse_classes)
        return {
            "feature_strides": {k: v.stride for k, v in input_shape.items()},
            "coarse_in_features": pr.COARSE_HEAD.IN_FEATURES,
            "pooler_resolution": cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
            "coarse_head": PointRendCoarseMaskHead(cfg, coarse_channels, coarse_classes),
            "point_in_features": pr.IN_FEATURES,
            "point_head": point_head,
            "train_num_points": pr.TRAIN_NUM_POINTS,
            "oversample_ratio": pr.OVERSAMPLE_RATIO,
            "importance_sample_ratio": pr.IMPORTANCE_SAMPLE_RATIO,
            "subdivision_steps": pr.SUBDIVISION_STEPS,
            "subdivision_num_points": pr.SUBDIVISION_NUM_POINTS,
            "coarse_side": pr.COARSE_HEAD.OUTPUT_SIDE_RESOLUTION,
            "project_fine_features": pr.PROJECT_FINE_FEATURES,
        }

    # ---- features at points --------------------------------------------------------
    def _sample_maps(self, maps: List[torch.Tensor], strides: List[int], boxes: List[Boxes],
                     box_points: torch.Tensor) -> torch.Tensor:
        """
        Args:
            maps: per-image feature maps (B, C_i, H_i, W_i).
            boxes: B Boxes, R in all; box_points: (R, P, 2) box-relative points.

        Returns:
            (sum C_i, R*P) features, channel-first, concatenated over the maps.
        """
        num_per_image = [len(b) for b in boxes]
        pts = box_points_to_image(Boxes.cat(boxes).tensor, box_points)
        out = []
        for fmap, stride in zip(maps, strides):
            h, w = fmap.shape[-2:]
            size = torch.tensor([w * stride, h * stride], dtype=pts.dtype, device=pts.device)
            out.append(point_sample_per_image(fmap, pts / size, num_per_image))
        return out[0] if len(out) == 1 else cat(out, dim=0)

    def pool_regions(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """(R, C, S, S) features on a regular S x S grid of cell centres inside each box."""
        R = sum(len(b) for b in boxes)
        S = self.pooler_resolution
        dev = boxes[0].tensor.device
        grid = regular_grid_points(R, S, dev, features[self.coarse_in_features[0]].dtype)
        maps = [features[f] for f in self.coarse_in_features]
        strides = [self.feature_strides[f] for f in self.coarse_in_features]
        pooled = self._sample_maps(maps, strides, boxes, grid)
        return pooled.view(pooled.shape[0], R, S, S).transpose(0, 1).contiguous()

    def fine_features(self, features, boxes, box_points, maps=None):
        """(Cf, R*P) point-head features at box-relative points (``maps``: pre-projected)."""
        if maps is None:
            maps = [features[f] for f in self.point_in_features]
        strides = [self.feature_strides[f] for f in self.point_in_features]
        return self._sample_maps(maps, strides, boxes, box_points)

    # ---- training / inference --------------------------------------------------------
    def forward(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """
        Args:
            features: feature maps by name, (B, C, H, W) each.
            instances: B Instances: foreground proposals with gt fields in training,
                detections (pred_boxes, pred_classes) at inference.

        Returns:
            training: dict of losses ("loss_mask", "loss_mask_point");
            inference: ``instances`` with ``pred_masks`` (R_i, 1, H, W) probabilities.
        """
        if self.training:
            return self._forward_train(features, instances)
        return self._forward_inference(features, instances)

    def _forward_train(self, features, instances):
        boxes = [x.proposal_boxes for x in instances]
        R = sum(len(b) for b in boxes)
        coarse = self.coarse_head(self.pool_regions(features, boxes))
        losses = {"loss_mask": mask_rcnn_loss(coarse, instances)}
        if self.point_head is None:
            return losses
        gt_classes = (
            cat([x.gt_classes for x in instances]) if R else torch.zeros(0, dtype=torch.long, device=coarse.device)
        )
        with torch.no_grad():
            points = sample_training_points(
                coarse,
                lambda logits: instance_uncertainty(_class_channel(logits, gt_classes)),
                self.train_num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels = point_labels_from_masks(
                instances, box_points_to_image(Boxes.cat(boxes).tensor, points)
            ) if R else coarse.new_zeros((0, points.shape[1]))
        if R == 0:
            # Keep every parameter in the graph (DDP) with a zero loss.
            zero = sum(p.sum() for p in self.point_head.parameters()) * 0.0
            losses["loss_mask_point"] = zero
            return losses
        fine = self.fine_features(features, boxes, points)
        P = points.shape[1]
        point_logits = self.point_head.forward_flat(fine, _flat(point_sample(coarse, points)), R)
        point_logits = point_logits.view(point_logits.shape[0], R, P).transpose(0, 1)
        losses["loss_mask_point"] = instance_point_loss(point_logits, gt_classes, labels)
        return losses

    def _use_projection(self, features, num_regions: int) -> bool:
        if self.project_fine_features != "auto":
            return self.project_fine_features == "always"
        num_points = num_regions * (self.init_side ** 2 + self.subdivision_steps * self.subdivision_num_points)
        positions = sum(features[f].shape[0] * features[f].shape[2] * features[f].shape[3]
                        for f in self.point_in_features)
        return num_points > positions

    def _projected_maps(self, features):
        """The point head's first-layer fine weights applied to each IN_FEATURES map."""
        maps, start = [], 0
        w = self.point_head._split(0)[0]
        for f in self.point_in_features:
            c = features[f].shape[1]
            maps.append(F.conv2d(features[f], w[:, start:start + c, None, None]))
            start += c
        return maps

    def _forward_inference(self, features, instances):
        boxes = [x.pred_boxes for x in instances]
        R = sum(len(b) for b in boxes)
        S_out = self.init_side * 2 ** self.subdivision_steps
        if R == 0:
            for x in instances:
                x.pred_masks = features[self.coarse_in_features[0]].new_zeros((0, 1, S_out, S_out))
            return instances
        classes = cat([x.pred_classes for x in instances])
        coarse = self.coarse_head(self.pool_regions(features, boxes))
        if self.point_head is None:
            mask_rcnn_inference(coarse, instances)
            return instances

        projected = self._use_projection(features, R)
        maps = self._projected_maps(features) if projected else None
        class_arg = classes if coarse.shape[1] > 1 else None

        def predict(box_points):
            """(R, P, 2) box-relative points -> (R, 1, P) logits of each region's class."""
            fine = self.fine_features(features, boxes, box_points, maps)
            coarse_at_points = _flat(point_sample(coarse, box_points))
            out = self.point_head.forward_flat(fine, coarse_at_points, R, class_arg, projected)
            out = out.view(out.shape[0], R, box_points.shape[1]).transpose(0, 1)
            return _class_channel(out, classes)

        side = self.init_side
        grid = regular_grid_points(R, side, coarse.device, coarse.dtype)
        logits = predict(grid).reshape(R, 1, side, side)
        logits = subdivide(
            logits,
            predict,
            self.subdivision_steps,
            self.subdivision_num_points,
            instance_uncertainty,
        )
        mask_rcnn_inference(logits, instances)
        return instances
