"""CondInst (Tian, Shen, Chen, ECCV 2020) as a mask head of d2seg's OneStageDetector.

Per positive location / detection, a controller on FCOS's box tower predicts the
parameters of a tiny fully convolutional mask head (3 layers of 1x1 convs, 8 channels:
169 numbers); that head runs on the image's mask-branch features plus two relative-
coordinate channels (computed inside the fused op ``d2seg.layers.dynamic_mask_head``) and
gives the instance's whole-image mask at 1/8, upsampled to 1/4 (``MASK_OUT_STRIDE``).

Shape shorthand:
    N: images, Hp, Wp: padded input size, Hs, Ws = Hp/8, Wp/8 (mask features),
    Ho, Wo = Hp/4, Wp/4 (mask output), F: mask-feature channels, P: dynamic parameters
    per instance (169), R: instances (sampled positives or detections), G: GT instances.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import BitMasks, ImageList, Instances, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask

from d2seg.fcos import ONE_STAGE_MASK_HEAD_REGISTRY, OneStageMaskHead
from d2seg.layers import dynamic_mask_head, dynamic_mask_head_num_params
from d2seg.layers.mask_resize import resize_and_threshold

from .mask_branch import UPSAMPLING, MaskBranch, semantic_targets, upsample

__all__ = ["CondInstMaskHead", "dice_loss", "gt_bitmasks_padded", "mask_centers_of_mass",
           "sizes_of_interest_per_level"]


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """(R,) 1 - 2|X.Y| / (|X|^2 + |Y|^2) per instance; probs, targets (R, ...)."""
    x, y = probs.flatten(1), targets.flatten(1).to(probs.dtype)
    inter = (x * y).sum(1)
    union = (x * x).sum(1) + (y * y).sum(1) + eps
    return 1.0 - 2.0 * inter / union


def gt_bitmasks_padded(instances: Instances, padded_hw) -> Tensor:
    """(G, Hp, Wp) float 0/1 masks of ``instances.gt_masks`` (BitMasks or PolygonMasks),
    zero-padded to the batch's padded size."""
    Hp, Wp = padded_hw
    h, w = instances.image_size
    if not instances.has("gt_masks"):
        raise ValueError("CondInst training needs gt_masks in every image's instances (INPUT.MASK_FORMAT / MASK_ON).")
    gm = instances.gt_masks
    if isinstance(gm, BitMasks):
        m = gm.tensor
    elif isinstance(gm, PolygonMasks):
        m = torch.stack([torch.from_numpy(polygons_to_bitmask(p, h, w)) for p in gm.polygons]) if len(gm) else (
            torch.zeros((0, h, w), dtype=torch.bool))
    else:
        raise ValueError(f"CondInst: unsupported gt_masks type {type(gm).__name__} (BitMasks or PolygonMasks).")
    m = m.to(device=instances.gt_classes.device, dtype=torch.float32)
    return F.pad(m, (0, Wp - m.shape[-1], 0, Hp - m.shape[-2]))


def mask_centers_of_mass(masks: Tensor) -> Tensor:
    """(G, 2) (x, y) mean pixel index of each of the (G, H, W) 0/1 masks (pixel (i, j) counts
    at (j, i), AdelaiDet's convention); an empty mask gives (0, 0)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 2))
    m = masks.float()
    area = m.sum(dim=(1, 2)).clamp(min=1e-6)
    xs = torch.arange(m.shape[2], dtype=m.dtype, device=m.device)
    ys = torch.arange(m.shape[1], dtype=m.dtype, device=m.device)
    cx = (m * xs).sum(dim=(1, 2)) / area
    cy = (m * ys[:, None]).sum(dim=(1, 2)) / area
    return torch.stack([cx, cy], dim=1)


def sizes_of_interest_per_level(fcos_sizes_of_interest: List[int]) -> List[float]:
    """Per-level scale of the relative coordinates: FCOS's size bounds plus twice the last
    (AdelaiDet's convention; [64, 128, 256, 512] -> [64, 128, 256, 512, 1024])."""
    soi = [float(s) for s in fcos_sizes_of_interest]
    return soi + [soi[-1] * 2]


@ONE_STAGE_MASK_HEAD_REGISTRY.register()
class CondInstMaskHead(OneStageMaskHead):
    """CondInst's controller, mask branch and dynamic mask head (``MODEL.ONE_STAGE_MASK_HEAD.NAME:
    CondInstMaskHead``). ``controller`` is the ``top_module`` that FCOS runs on its box tower."""

    @configurable
    def __init__(
        self,
        *,
        mask_branch: MaskBranch,
        in_channels: int,
        channels: int = 8,
        num_layers: int = 3,
        rel_coords: bool = True,
        sizes_of_interest: List[float],
        mask_out_stride: int = 4,
        max_proposals: int = -1,
        topk_proposals_per_im: int = -1,
        mask_threshold: float = 0.5,
        upsampling: str = "centers",
        mask_center_sampling: bool = False,
    ):
        """
        Args:
            mask_branch: gives (N, F, Hs, Ws) mask features.
            in_channels: channels of FCOS's box tower (controller input).
            channels, num_layers: width and depth of the dynamic mask head.
            rel_coords: prepend the two relative-coordinate channels.
            sizes_of_interest: per FPN level, divisor of the relative coordinates.
            mask_out_stride: stride of the output masks (<= the mask branch's stride).
            max_proposals, topk_proposals_per_im: training subsample of positives (-1: all).
            mask_threshold: foreground threshold on probabilities at inference.
            upsampling: "centers" or "adelaidet" (``MODEL.CONDINST.UPSAMPLING``), for the
                dynamic head's output and the inference masks (the mask branch has its own).
            mask_center_sampling: give FCOS the masks' centres of mass for central sampling
                (``gt_centers``, see :meth:`prepare_targets`).
        """
        super().__init__()
        self.mask_branch = mask_branch
        self.channels, self.num_layers, self.rel_coords = channels, num_layers, rel_coords
        feat_channels = mask_branch.out_channels + (2 if rel_coords else 0)
        if feat_channels == 0:
            raise ValueError(
                "CondInst: the dynamic head has no input (MASK_BRANCH.OUT_CHANNELS=0 and DISABLE_REL_COORDS=True)."
            )
        self.num_gen_params = dynamic_mask_head_num_params(feat_channels, channels, num_layers)
        self.controller = nn.Conv2d(in_channels, self.num_gen_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.constant_(self.controller.bias, 0)
        self.register_buffer("sizes_of_interest", torch.tensor(sizes_of_interest, dtype=torch.float32), False)
        self.mask_feat_stride = mask_branch.out_stride
        if self.mask_feat_stride % mask_out_stride != 0:
            raise ValueError(
                f"MODEL.CONDINST.MASK_OUT_STRIDE={mask_out_stride} must divide the mask branch stride "
                f"{self.mask_feat_stride}."
            )
        self.mask_out_stride = mask_out_stride
        self.max_proposals, self.topk_proposals_per_im = max_proposals, topk_proposals_per_im
        self.mask_threshold = mask_threshold
        if upsampling not in UPSAMPLING:
            raise ValueError(f"MODEL.CONDINST.UPSAMPLING must be one of {sorted(UPSAMPLING)}, got {upsampling!r}")
        self.upsampling = upsampling
        self.mask_center_sampling = mask_center_sampling

    # The controller is the module FCOS runs on its box tower; keep its AdelaiDet name.
    @property
    def top_module(self):
        return self.__dict__["_modules"].get("controller")

    @top_module.setter
    def top_module(self, value):
        if value is not None:
            raise AttributeError("CondInstMaskHead.top_module is its controller; set .controller instead.")

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ci = cfg.MODEL.CONDINST
        mb = ci.MASK_BRANCH
        branch = MaskBranch(
            input_shape,
            in_features=mb.IN_FEATURES,
            channels=mb.CHANNELS,
            out_channels=mb.OUT_CHANNELS,
            num_convs=mb.NUM_CONVS,
            norm=mb.NORM,
            semantic_loss_on=mb.SEMANTIC_LOSS_ON,
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
            focal_alpha=cfg.MODEL.FCOS.LOSS_ALPHA,
            focal_gamma=cfg.MODEL.FCOS.LOSS_GAMMA,
            upsampling=ci.UPSAMPLING,
        )
        return {
            "mask_branch": branch,
            "in_channels": input_shape[cfg.MODEL.FCOS.IN_FEATURES[0]].channels,
            "channels": ci.MASK_HEAD.CHANNELS,
            "num_layers": ci.MASK_HEAD.NUM_LAYERS,
            "rel_coords": not ci.MASK_HEAD.DISABLE_REL_COORDS,
            "sizes_of_interest": sizes_of_interest_per_level(cfg.MODEL.FCOS.SIZES_OF_INTEREST),
            "mask_out_stride": ci.MASK_OUT_STRIDE,
            "max_proposals": ci.MAX_PROPOSALS,
            "topk_proposals_per_im": ci.TOPK_PROPOSALS_PER_IM,
            "mask_threshold": ci.MASK_THRESHOLD,
            "upsampling": ci.UPSAMPLING,
            "mask_center_sampling": ci.MASK_CENTER_SAMPLING,
        }

    # ------------------------------------------------------------------------------------
    def mask_logits(self, mask_feats: Tensor, instances: Instances, im_inds: Tensor) -> Tensor:
        """(R, 1, Ho, Wo) mask logits at MASK_OUT_STRIDE for R instances with fields
        ``top_feats`` (R, P), ``locations`` (R, 2), ``fpn_levels`` (R,)."""
        params = instances.top_feats
        if self.rel_coords:
            locs = instances.locations
            scales = self.sizes_of_interest.to(params.dtype)[instances.fpn_levels]
        else:
            locs = scales = None
        logits = dynamic_mask_head(
            mask_feats, im_inds, params, channels=self.channels, num_layers=self.num_layers,
            instance_locations=locs, mask_feat_stride=self.mask_feat_stride, scales=scales,
        )
        return upsample(logits, self.mask_feat_stride // self.mask_out_stride, self.upsampling)

    def _sample_positives(self, pos: Instances, num_images: int) -> Instances:
        if self.topk_proposals_per_im > 0 and len(pos):
            # AdelaiDet's split: the image's quota shared by its objects with positives.
            keep = []
            score = pos.logits_pred.sigmoid().max(dim=1).values * pos.ctrness_pred.sigmoid()
            for i in range(num_images):
                in_image = pos.im_inds == i
                gt_inds = pos.gt_inds[in_image].unique()
                if len(gt_inds) == 0:
                    continue
                k = max(int(self.topk_proposals_per_im / len(gt_inds)), 1)
                for g in gt_inds:
                    idx = (in_image & (pos.gt_inds == g)).nonzero().flatten()
                    if idx.numel() > k:
                        idx = idx[score[idx].topk(k).indices]
                    keep.append(idx)
            pos = pos[torch.cat(keep).sort().values]
        if 0 < self.max_proposals < len(pos):
            pos = pos[torch.randperm(len(pos), device=pos.im_inds.device)[: self.max_proposals]]
        return pos

    def prepare_targets(self, images: ImageList, gt_instances: List[Instances]) -> None:
        """Before FCOS assigns its targets: with ``mask_center_sampling``, set each image's
        ``gt_centers`` (G, 2) to its masks' centres of mass (:func:`mask_centers_of_mass`)."""
        if not self.mask_center_sampling:
            return
        padded = tuple(images.tensor.shape[-2:])
        for inst in gt_instances:
            inst.gt_centers = mask_centers_of_mass(gt_bitmasks_padded(inst, padded))

    def losses(self, images: ImageList, features, fcos_outputs, gt_instances: List[Instances]):
        padded = tuple(images.tensor.shape[-2:])
        bitmasks = [gt_bitmasks_padded(inst, padded) for inst in gt_instances]
        sem = None
        if self.mask_branch.semantic_loss_on:
            sem = semantic_targets(bitmasks, [g.gt_classes for g in gt_instances], self.mask_branch.out_stride)
        mask_feats, losses = self.mask_branch(features, sem)

        pos = self._sample_positives(fcos_outputs.positives, len(gt_instances))
        if len(pos) == 0:
            zero = mask_feats.sum() * 0 + sum(t.sum() for t in fcos_outputs.top_feats) * 0
            losses["loss_mask"] = zero
            return losses
        s, start = self.mask_out_stride, self.mask_out_stride // 2
        # (sum G, Ho, Wo) targets at the output pixel centres; row of each positive's GT.
        targets = torch.cat([b[:, start::s, start::s] for b in bitmasks])
        offsets = torch.tensor([0] + [len(g) for g in gt_instances], device=targets.device).cumsum(0)
        gt_rows = offsets[pos.im_inds] + pos.gt_inds
        logits = self.mask_logits(mask_feats, pos, pos.im_inds)  # (R, 1, Ho, Wo)
        losses["loss_mask"] = dice_loss(logits.sigmoid(), targets[gt_rows][:, None]).mean()
        return losses

    def inference(self, images: ImageList, features, fcos_outputs, detections: List[Instances]):
        mask_feats, _ = self.mask_branch(features)
        Hp, Wp = images.tensor.shape[-2:]
        num = [len(d) for d in detections]
        if sum(num) == 0:
            for d, (h, w) in zip(detections, images.image_sizes):
                d.pred_global_masks = mask_feats.new_zeros((0, 1, h, w))
            return detections
        # Instances.cat needs equal image sizes; the images of a batch may differ.
        dets = Instances(tuple(images.tensor.shape[-2:]))
        for name in ("top_feats", "locations", "fpn_levels"):
            dets.set(name, torch.cat([d.get(name) for d in detections]))
        im_inds = torch.cat([torch.full((n,), i, dtype=torch.long, device=mask_feats.device) for i, n in enumerate(num)])
        probs = self.mask_logits(mask_feats, dets, im_inds).sigmoid()  # (R, 1, Ho, Wo)
        probs = upsample(probs, self.mask_out_stride, self.upsampling)[:, :, :Hp, :Wp]  # (R, 1, Hp, Wp)
        for d, p, (h, w) in zip(detections, probs.split(num), images.image_sizes):
            d.pred_global_masks = p[:, :, :h, :w]
        return detections

    def postprocess(self, result: Instances, output_height: int, output_width: int) -> Instances:
        """Boxes via Detectron2's ``detector_postprocess``; whole-image mask probabilities
        resized bilinearly to the output size and thresholded into ``pred_masks`` (R, H, W)."""
        if not result.has("pred_global_masks"):
            return detector_postprocess(result, output_height, output_width)
        # The (R, 1, h, w) masks stay out of detector_postprocess (its filter of empty boxes
        # would copy all of them) and are indexed by the rows it keeps, when it drops any.
        m = result.pred_global_masks
        result.remove("pred_global_masks")
        result.postprocess_row = torch.arange(len(result), device=m.device)
        r = detector_postprocess(result, output_height, output_width)
        rows = r.postprocess_row
        r.remove("postprocess_row")
        if len(rows) != len(m):
            m = m[rows]
        if len(m) and tuple(m.shape[-2:]) != (output_height, output_width):
            # resized and thresholded a few masks at a time: a large photo never holds the
            # float masks of every detection at once (d2seg.layers.mask_resize)
            size = (output_height, output_width)
            r.pred_masks = resize_and_threshold(
                m, lambda c: F.interpolate(c, size=size, mode="bilinear", align_corners=False)[:, 0],
                self.mask_threshold)
            return r
        if not len(m):
            m = m.new_zeros((0, 1, output_height, output_width))
        r.pred_masks = m[:, 0] > self.mask_threshold
        return r
