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
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances

from d2seg.condinst.condinst import gt_bitmasks_padded
from d2seg.condinst.mask_branch import semantic_targets
from d2seg.fcos import ONE_STAGE_MASK_HEAD_REGISTRY, OneStageMaskHead
from d2seg.fcos.fcos import flatten_levels
from d2seg.fcos.inference import decode_ltrb

from .basis_module import BasisModule, painted_semantic_targets
from .blender import blend, crop_bases

__all__ = ["BlendMaskHead"]


# MODEL.BASIS_MODULE.SEM_TARGETS -> (bitmasks, classes, stride) -> (N, Hs, Ws) labels
SEM_TARGETS = {"smallest_at_centers": semantic_targets, "last_at_corners": painted_semantic_targets}


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
        mask_threshold: float = 0.5,
        crop_unclipped_boxes: bool = False,
        sem_targets: str = "smallest_at_centers",
    ):
        super().__init__()
        if sem_targets not in SEM_TARGETS:
            raise ValueError(f"MODEL.BASIS_MODULE.SEM_TARGETS must be one of {sorted(SEM_TARGETS)}, "
                             f"got {sem_targets!r}")
        self.mask_threshold = mask_threshold
        self.crop_unclipped_boxes = crop_unclipped_boxes
        self.sem_targets = sem_targets
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
            "mask_threshold": bm.MASK_THRESHOLD,
            "crop_unclipped_boxes": bm.CROP_UNCLIPPED_BOXES,
            "sem_targets": bs.SEM_TARGETS,
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
            sem = SEM_TARGETS[self.sem_targets](bitmasks, [g.gt_classes for g in gt_instances],
                                                self.basis_module.in_stride)
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
        if self.crop_unclipped_boxes:
            boxes = torch.cat([self._unclipped_boxes(fcos_outputs, i, d) for i, d in enumerate(detections)])
        else:
            boxes = torch.cat([d.pred_boxes.tensor for d in detections])
        attns = torch.cat([d.top_feats for d in detections])
        im_inds = torch.cat([torch.full((n,), i, dtype=torch.long, device=bases.device) for i, n in enumerate(num)])
        probs = self.mask_logits(bases, boxes, im_inds, attns).sigmoid()[:, None]
        for d, p in zip(detections, probs.split(num)):
            d.pred_masks = p
        return detections

    @staticmethod
    def _unclipped_boxes(fcos_outputs, image: int, det: Instances) -> Tensor:
        """(R, 4) the boxes of ``det`` (detections of image ``image``) as FCOS regressed them,
        before clipping: decoded again from the regression at their locations."""
        reg = flatten_levels(fcos_outputs.bbox_reg)[image, det.loc_inds]  # (R, 4), / stride
        strides = torch.tensor(fcos_outputs.strides, dtype=reg.dtype, device=reg.device)[det.fpn_levels]
        return decode_ltrb(det.locations, reg * strides[:, None])

    def postprocess(self, result: Instances, output_height: int, output_width: int) -> Instances:
        """Detectron2's ``detector_postprocess``: boxes rescaled and clipped, the (R, 1, S, S)
        box masks pasted into them and thresholded at ``MASK_THRESHOLD``."""
        return detector_postprocess(result, output_height, output_width, mask_threshold=self.mask_threshold)
