"""The SOLO, Decoupled SOLO and SOLOv2 meta-architectures.

Shape shorthand:
    N: images      L: levels      S: a level's grid size      C: classes
    P: positive cells of a level (whole batch)     R: masks asked for
    Hp, Wp: padded batch size     h, w: a level's mask output size

All three share the grid assignment, the category branch, the losses and the inference;
they differ only in how the mask of a grid cell is produced, which each subclass answers
with :meth:`level_mask_probs` and :meth:`level_mask_size`:

- ``SOLO``: the level's mask branch has one output channel per cell (S^2 channels).
- ``DecoupledSOLO``: X (S channels) times Y (S channels): cell (i, j) is X_j * Y_i.
- ``SOLOv2``: a cell predicts a 1x1 kernel applied to one unified mask feature.
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch import nn

from d2seg.layers.inference_speed import fold_frozen_batchnorm, to_inference_layout

from .heads import DecoupledSOLOInsHead, SOLOInsHead, SOLOv2InsHead, SOLOv2MaskHead
from .inference import InferenceParams, empty_instances, point_nms, postprocess_candidates
from .kernels import dynamic_kernel_product
from .losses import category_focal_loss, dice_loss
from .targets import (
    CELL_CONFLICTS,
    CENTER_CONVENTIONS,
    TARGET_DOWNSAMPLES,
    assign_grid_targets,
    flatten_cate_labels,
    mask_targets_at,
)

__all__ = ["SOLOBase", "SOLO", "DecoupledSOLO", "SOLOv2"]


class SOLOBase(nn.Module):
    """Shared body: backbone, level features, targets, losses, inference."""

    ins_head_class = None  # set by subclasses

    @configurable
    def __init__(
        self,
        *,
        backbone,
        ins_head,
        instance_in_features: List[str],
        instance_strides: List[int],
        scale_ranges,
        num_grids: List[int],
        sigma: float,
        num_classes: int,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 3.0,
        center_convention: str = "pixel_centers",
        cell_conflict: str = "smaller",
        mask_target_downsample: str = "area",
        inference_params: InferenceParams = InferenceParams(),
        pixel_mean,
        pixel_std,
        fast_inference: bool = False,
    ):
        super().__init__()
        n = len(instance_in_features)
        for name, v in (("FPN_INSTANCE_STRIDES", instance_strides),
                        ("FPN_SCALE_RANGES", scale_ranges), ("NUM_GRIDS", num_grids)):
            if len(v) != n:
                raise ValueError(f"MODEL.SOLO.{name} has {len(v)} entries but "
                                 f"INSTANCE_IN_FEATURES has {n}")
        self.backbone = backbone
        # MODEL.FAST_INFERENCE: inference-only speed-ups (d2seg.layers.inference_speed)
        self.fast_inference = bool(fast_inference)
        if self.fast_inference:
            fold_frozen_batchnorm(self.backbone)
        self.ins_head = ins_head
        self.instance_in_features = list(instance_in_features)
        self.instance_strides = list(instance_strides)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.num_grids = list(num_grids)
        self.sigma = sigma
        self.num_classes = num_classes
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        for key, v, allowed in (("CENTER_CONVENTION", center_convention, CENTER_CONVENTIONS),
                                ("CELL_CONFLICT", cell_conflict, CELL_CONFLICTS),
                                ("MASK_TARGET_DOWNSAMPLE", mask_target_downsample, TARGET_DOWNSAMPLES)):
            if v not in allowed:
                raise ValueError(f"MODEL.SOLO.{key} must be one of {allowed}, got {v!r}")
        self.center_convention = center_convention
        self.cell_conflict = cell_conflict
        self.mask_target_downsample = mask_target_downsample
        self.inference_params = inference_params
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SOLO
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in c.INSTANCE_IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.SOLO.INSTANCE_IN_FEATURES {missing} are not backbone "
                             f"outputs {sorted(shapes)}")
        return {
            "backbone": backbone,
            "ins_head": cls.ins_head_class(cfg, [shapes[f] for f in c.INSTANCE_IN_FEATURES]),
            "instance_in_features": c.INSTANCE_IN_FEATURES,
            "instance_strides": c.FPN_INSTANCE_STRIDES,
            "scale_ranges": c.FPN_SCALE_RANGES,
            "num_grids": c.NUM_GRIDS,
            "sigma": c.SIGMA,
            "num_classes": c.NUM_CLASSES,
            "focal_alpha": c.LOSS.FOCAL_ALPHA,
            "focal_gamma": c.LOSS.FOCAL_GAMMA,
            "focal_weight": c.LOSS.FOCAL_WEIGHT,
            "dice_weight": c.LOSS.DICE_WEIGHT,
            "center_convention": c.CENTER_CONVENTION,
            "cell_conflict": c.CELL_CONFLICT,
            "mask_target_downsample": c.MASK_TARGET_DOWNSAMPLE,
            "inference_params": InferenceParams(
                score_thr=c.SCORE_THR, mask_thr=c.MASK_THR, nms_pre=c.NMS_PRE,
                max_per_img=c.MAX_PER_IMG, nms_type=c.NMS_TYPE, nms_iou_thr=c.NMS_IOU_THR,
                nms_kernel=c.NMS_KERNEL, nms_sigma=c.NMS_SIGMA, update_thr=c.UPDATE_THR),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "fast_inference": cfg.MODEL.FAST_INFERENCE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ---- what subclasses define ----
    def predict(self, features: Dict[str, torch.Tensor], level_features):
        """-> (cate_preds: L tensors (N, C, S, S), mask_state: subclass-specific)."""
        return self.ins_head(level_features)

    def level_mask_probs(self, mask_state, level, img_inds, cells):
        """(R,) image indices and cell indices (row * S + col) -> (R, h, w) probabilities."""
        raise NotImplementedError

    def level_mask_size(self, mask_state, level):
        """(h, w) of the masks of ``level``."""
        raise NotImplementedError

    def _zero_mask_loss(self, mask_state):
        """0 that still depends on the mask outputs (no positives in the batch)."""
        raise NotImplementedError

    # ---- shared ----
    def preprocess_image(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def level_features(self, features, padded_size):
        """Each instance feature resized to (ceil(Hp / stride), ceil(Wp / stride)): with
        the papers' settings P2 is halved and P6 doubled."""
        out = []
        for f, s in zip(self.instance_in_features, self.instance_strides):
            x = features[f]
            size = (math.ceil(padded_size[0] / s), math.ceil(padded_size[1] / s))
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(x)
        return out

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs: list of dicts from Detectron2's DatasetMapper: "image"
                (3, H, W); in training "instances" with gt_classes and gt_masks (BitMasks);
                optionally "height", "width" for the output size.
        Returns:
            training: dict of losses ("loss_cate", "loss_mask");
            inference: list of {"instances": Instances}.
        """
        images = self.preprocess_image(batched_inputs)
        padded_size = tuple(images.tensor.shape[-2:])
        x = to_inference_layout(images.tensor, self.training) if self.fast_inference else images.tensor
        features = self.backbone(x)
        cate_preds, mask_state = self.predict(features, self.level_features(features, padded_size))
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("SOLO training needs 'instances' in every input dict")
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(cate_preds, mask_state, gt, padded_size)
        return self.inference(cate_preds, mask_state, batched_inputs, images.image_sizes,
                              padded_size)

    def losses(self, cate_preds, mask_state, gt_instances, padded_size):
        for i, inst in enumerate(gt_instances):
            if len(inst) and not inst.has("gt_masks"):
                raise ValueError(f"image {i}: SOLO needs gt_masks (set INPUT.MASK_FORMAT and "
                                 f"MODEL.MASK_ON)")
        targets = assign_grid_targets(gt_instances, padded_size, self.num_grids,
                                      self.scale_ranges, self.sigma, self.num_classes,
                                      self.center_convention, self.cell_conflict)
        # positive cells (with CELL_CONFLICT "later" a cell can have several mask targets)
        num_pos = sum(int((t.cate_labels != self.num_classes).sum()) for t in targets)
        logits = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, self.num_classes)
                            for p in cate_preds])
        loss_cate = self.focal_weight * category_focal_loss(
            logits, flatten_cate_labels(targets), self.num_classes, self.focal_alpha,
            self.focal_gamma, num_pos)
        dice = []
        for lvl, t in enumerate(targets):
            if len(t.pos_img) == 0:
                continue
            probs = self.level_mask_probs(mask_state, lvl, t.pos_img, t.pos_cell)
            target = mask_targets_at(gt_instances, padded_size, tuple(probs.shape[-2:]),
                                     t.pos_img, t.pos_gt, self.mask_target_downsample)
            dice.append(dice_loss(probs, target))
        if dice:
            loss_mask = self.dice_weight * torch.cat(dice).mean()
        else:
            loss_mask = self._zero_mask_loss(mask_state)
        return {"loss_cate": loss_cate, "loss_mask": loss_mask}

    @torch.no_grad()
    def inference(self, cate_preds, mask_state, batched_inputs, image_sizes, padded_size):
        common = max((self.level_mask_size(mask_state, lvl) for lvl in range(len(cate_preds))),
                     key=lambda s: s[0] * s[1])
        probs_all = [point_nms(p.sigmoid()) for p in cate_preds]
        results = []
        for n, (inp, image_size) in enumerate(zip(batched_inputs, image_sizes)):
            out_size = (inp.get("height", image_size[0]), inp.get("width", image_size[1]))
            masks, scores, classes, min_areas = [], [], [], []
            for lvl, p in enumerate(probs_all):
                flat = p[n].permute(1, 2, 0).reshape(-1, self.num_classes)  # (S*S, C)
                cells, cls = torch.nonzero(flat > self.inference_params.score_thr, as_tuple=True)
                if len(cells) == 0:
                    continue
                m = self.level_mask_probs(mask_state, lvl, torch.full_like(cells, n), cells)
                if tuple(m.shape[-2:]) != tuple(common):
                    m = F.interpolate(m[None], size=tuple(common), mode="bilinear",
                                      align_corners=False)[0]
                masks.append(m)
                scores.append(flat[cells, cls])
                classes.append(cls)
                min_areas.append(torch.full((len(cells),), float(self.instance_strides[lvl]),
                                            device=m.device))
            if not masks:
                results.append({"instances": empty_instances(out_size, self.device)})
                continue
            results.append({"instances": postprocess_candidates(
                torch.cat(masks), torch.cat(scores), torch.cat(classes), torch.cat(min_areas),
                self.inference_params, tuple(image_size), padded_size, out_size)})
        return results


@META_ARCH_REGISTRY.register()
class SOLO(SOLOBase):
    """SOLO (Wang et al., ECCV 2020): S^2 mask channels per level."""

    ins_head_class = SOLOInsHead

    def level_mask_probs(self, mask_state, level, img_inds, cells):
        return self.ins_head.level_mask_probs(mask_state, level, img_inds, cells,
                                              self.num_grids[level])

    def level_mask_size(self, mask_state, level):
        return tuple(mask_state[level].shape[-2:])

    def _zero_mask_loss(self, mask_state):
        return sum(m.sum() for m in mask_state) * 0.0


@META_ARCH_REGISTRY.register()
class DecoupledSOLO(SOLO):
    """Decoupled SOLO: masks as the product of X (S channels) and Y (S channels)."""

    ins_head_class = DecoupledSOLOInsHead

    def level_mask_size(self, mask_state, level):
        return tuple(mask_state[level][0].shape[-2:])

    def _zero_mask_loss(self, mask_state):
        return sum(x.sum() + y.sum() for x, y in mask_state) * 0.0


@META_ARCH_REGISTRY.register()
class SOLOv2(SOLOBase):
    """SOLOv2 (Wang et al., NeurIPS 2020): dynamic 1x1 kernels on a unified mask feature."""

    ins_head_class = SOLOv2InsHead

    @configurable
    def __init__(self, *, mask_head, mask_in_features, **kw):
        super().__init__(**kw)
        self.mask_head = mask_head
        self.mask_in_features = list(mask_in_features)

    @classmethod
    def from_config(cls, cfg):
        out = super().from_config(cfg)
        shapes = out["backbone"].output_shape()
        feats = cfg.MODEL.SOLO.MASK_IN_FEATURES
        missing = [f for f in feats if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.SOLO.MASK_IN_FEATURES {missing} are not backbone outputs "
                             f"{sorted(shapes)}")
        out["mask_head"] = SOLOv2MaskHead(cfg, [shapes[f] for f in feats])
        out["mask_in_features"] = feats
        return out

    def predict(self, features, level_features):
        cate_preds, kernel_preds = self.ins_head(level_features)
        mask_feat = self.mask_head([features[f] for f in self.mask_in_features])
        return cate_preds, (kernel_preds, mask_feat)

    def level_mask_probs(self, mask_state, level, img_inds, cells):
        kernel_preds, mask_feat = mask_state
        k = kernel_preds[level].flatten(2)  # (N, E, S*S)
        kernels = k[img_inds, :, cells]  # (R, E)
        return dynamic_kernel_product(kernels, mask_feat, img_inds).sigmoid()

    def level_mask_size(self, mask_state, level):
        return tuple(mask_state[1].shape[-2:])

    def _zero_mask_loss(self, mask_state):
        kernel_preds, mask_feat = mask_state
        return (sum(k.sum() for k in kernel_preds) + mask_feat.sum()) * 0.0
