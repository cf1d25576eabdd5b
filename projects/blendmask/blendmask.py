"""BlendMask (Chen et al., CVPR 2020) as a mask head of d2seg's OneStageDetector.

A bottom module predicts K bases at 1/4 of the input; a 3x3 conv on FCOS's box tower
(``top_layer``, the ``top_module``) predicts K x M x M attentions per location; the
blender crops the bases to each box at S x S, upsamples the attentions to S x S, softmaxes
them over K and sums the weighted bases into a box-relative mask.

Shape shorthand:
    N: images, K: bases, M: attention side, S: crop side (56), R: instances (positives
    in training, detections at inference), G: GT instances.

Training (paper / AdelaiDet): the crops use each positive's ground-truth box; the loss is
the per-pixel BCE against the GT mask cropped and resized to S x S, averaged per positive,
weighted by its centerness target and divided by the sum of centerness targets.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances

from d2seg.condinst.condinst import gt_bitmasks_padded
from d2seg.condinst.mask_branch import semantic_targets
from d2seg.fcos import ONE_STAGE_MASK_HEAD_REGISTRY, OneStageMaskHead

from .basis_module import BasisModule
from .blender import blend, crop_bases

__all__ = ["BlendMaskHead"]


@ONE_STAGE_MASK_HEAD_REGISTRY.register()
class BlendMaskHead(OneStageMaskHead):
    """``MODEL.ONE_STAGE_MASK_HEAD.NAME: BlendMaskHead``. ``pred_masks`` are (R, 1, S, S)
    box-relative probabilities, pasted into the image by Detectron2's postprocessing."""

    @configurable
    def __init__(
        self,
        *,
        basis_module: BasisModule,
        in_channels: int,
        num_bases: int = 4,
        attn_size: int = 14,
        bottom_resolution: int = 56,
        pooler_scale: float = 0.25,
        sampling_ratio: int = 1,
        top_interp: str = "bilinear",
        instance_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.basis_module = basis_module
        self.num_bases, self.attn_size = num_bases, attn_size
        self.bottom_resolution, self.pooler_scale = bottom_resolution, pooler_scale
        self.sampling_ratio, self.top_interp = sampling_ratio, top_interp
        self.instance_loss_weight = instance_loss_weight
        self.top_layer = nn.Conv2d(in_channels, num_bases * attn_size * attn_size, 3, padding=1)
        nn.init.normal_(self.top_layer.weight, std=0.01)
        nn.init.constant_(self.top_layer.bias, 0)

    # The attention conv is the module FCOS runs on its box tower; keep AdelaiDet's name.
    @property
    def top_module(self):
        return self._modules.get("top_layer")

    @top_module.setter
    def top_module(self, value):
        if value is not None:
            raise AttributeError("BlendMaskHead.top_module is its top_layer; set .top_layer instead.")

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        bm, bs = cfg.MODEL.BLENDMASK, cfg.MODEL.BASIS_MODULE
        if bs.NAME != "ProtoNet":
            raise ValueError(f"MODEL.BASIS_MODULE.NAME={bs.NAME!r}: only 'ProtoNet' is implemented.")
        if bm.POOLER_TYPE != "ROIAlignV2":
            raise ValueError(f"MODEL.BLENDMASK.POOLER_TYPE={bm.POOLER_TYPE!r}: only 'ROIAlignV2' is implemented.")
        if len(bm.POOLER_SCALES) != 1:
            raise ValueError(f"MODEL.BLENDMASK.POOLER_SCALES must have one entry (one basis map), got {bm.POOLER_SCALES}.")
        basis = BasisModule(
            input_shape,
            in_features=bs.IN_FEATURES,
            num_bases=bs.NUM_BASES,
            channels=bs.CONVS_DIM,
            num_convs=bs.NUM_CONVS,
            norm=bs.NORM,
            loss_on=bs.LOSS_ON,
            num_classes=bs.NUM_CLASSES,
            loss_weight=bs.LOSS_WEIGHT,
        )
        if abs(bm.POOLER_SCALES[0] * basis.out_stride - 1) > 1e-6:
            raise ValueError(
                f"MODEL.BLENDMASK.POOLER_SCALES={bm.POOLER_SCALES} does not match the bases' stride "
                f"{basis.out_stride} (expected ({1.0 / basis.out_stride},))."
            )
        return {
            "basis_module": basis,
            "in_channels": input_shape[cfg.MODEL.FCOS.IN_FEATURES[0]].channels,
            "num_bases": bs.NUM_BASES,
            "attn_size": bm.ATTN_SIZE,
            "bottom_resolution": bm.BOTTOM_RESOLUTION,
            "pooler_scale": bm.POOLER_SCALES[0],
            "sampling_ratio": bm.POOLER_SAMPLING_RATIO,
            "top_interp": bm.TOP_INTERP,
            "instance_loss_weight": bm.INSTANCE_LOSS_WEIGHT,
        }

    def mask_logits(self, bases: Tensor, boxes: Tensor, im_inds: Tensor, attns: Tensor) -> Tensor:
        """(R, S, S) blended mask logits for ``boxes`` (R, 4) of images ``im_inds`` (R,)."""
        rois = crop_bases(bases, boxes, im_inds, self.bottom_resolution, self.pooler_scale, self.sampling_ratio)
        return blend(rois, attns, self.attn_size, self.top_interp)

    def losses(self, images: ImageList, features, fcos_outputs, gt_instances: List[Instances]):
        sem = None
        if self.basis_module.loss_on:
            padded = tuple(images.tensor.shape[-2:])
            bitmasks = [gt_bitmasks_padded(g, padded) for g in gt_instances]
            sem = semantic_targets(bitmasks, [g.gt_classes for g in gt_instances], self.basis_module.in_stride)
        bases, losses = self.basis_module(features, sem)
        pos = fcos_outputs.positives
        if len(pos) == 0:
            losses["loss_mask"] = bases.sum() * 0 + sum(t.sum() for t in fcos_outputs.top_feats) * 0
            return losses
        S = self.bottom_resolution
        # GT masks cropped to their boxes at S x S, one row per GT of the batch.
        targets, boxes = [], []
        for g in gt_instances:
            if len(g) == 0:
                continue
            if not g.has("gt_masks"):
                raise ValueError("BlendMask training needs gt_masks in every image's instances (MASK_ON).")
            targets.append(g.gt_masks.crop_and_resize(g.gt_boxes.tensor, S).to(bases.device))
            boxes.append(g.gt_boxes.tensor)
        targets, boxes = torch.cat(targets).float(), torch.cat(boxes)
        offsets = torch.tensor([0] + [len(g) for g in gt_instances], device=bases.device).cumsum(0)
        rows = offsets[pos.im_inds] + pos.gt_inds
        logits = self.mask_logits(bases, boxes[rows], pos.im_inds, pos.top_feats)
        per_pos = F.binary_cross_entropy_with_logits(logits, targets[rows], reduction="none").flatten(1).mean(1)
        ctr = pos.ctrness_targets
        loss = (per_pos * ctr).sum() / ctr.sum().clamp(min=1e-6)
        losses["loss_mask"] = loss * self.instance_loss_weight
        return losses

    def inference(self, images: ImageList, features, fcos_outputs, detections: List[Instances]):
        bases, _ = self.basis_module(features)
        S = self.bottom_resolution
        num = [len(d) for d in detections]
        if sum(num) == 0:
            for d in detections:
                d.pred_masks = bases.new_zeros((0, 1, S, S))
            return detections
        boxes = torch.cat([d.pred_boxes.tensor for d in detections])
        attns = torch.cat([d.top_feats for d in detections])
        im_inds = torch.cat([torch.full((n,), i, dtype=torch.long, device=bases.device) for i, n in enumerate(num)])
        probs = self.mask_logits(bases, boxes, im_inds, attns).sigmoid()[:, None]
        for d, p in zip(detections, probs.split(num)):
            d.pred_masks = p
        return detections
