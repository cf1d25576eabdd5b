"""FCOS as a module that turns FPN features into per-location outputs, targets, losses
and detections: the part that FCOS-based instance segmentation methods build on.

Shape shorthand in this module:
    N: images, K: foreground classes, L: levels, Hl, Wl: size of level l,
    M = sum_l Hl * Wl locations per image, P: positive locations in the batch,
    D: channels of ``top_feats`` (output of an optional ``top_module``)

:class:`FCOS` is registered in Detectron2's ``PROPOSAL_GENERATOR_REGISTRY`` (as AdelaiDet
does, so the checkpoint prefix is ``proposal_generator.``), but its ``forward`` returns an
:class:`FCOSOutputs`, not RPN proposals: it is meant for :class:`OneStageDetector`.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import ImageList, Instances

from d2seg.layers import conv2d_at_locations, supports_conv2d_at_locations

from .head import FCOSHead
from .inference import fcos_inference_single_image
from .losses import FCOSLoss
from .targets import (
    FCOSTargets,
    assign_targets,
    compute_locations,
    ctrness_targets,
    size_ranges_from_sizes_of_interest,
)

__all__ = ["FCOS", "FCOSOutputs", "flatten_levels", "gather_at_locations"]


def flatten_levels(per_level: List[Tensor]) -> Tensor:
    """L tensors (N, C, Hl, Wl) -> (N, M, C), locations in the order of the targets."""
    return torch.cat(
        [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]) for x in per_level], dim=1
    )


def gather_at_locations(per_level: List[Tensor], im_inds: Tensor, loc_inds: Tensor) -> Tensor:
    """Values of a per-level map at given (image, location) pairs.

    Args:
        per_level: L tensors (N, C, Hl, Wl), e.g. ``FCOSOutputs.bbox_towers``.
        im_inds, loc_inds: (P,) image index and location index in [0, M).
    Returns:
        (P, C).
    """
    return flatten_levels(per_level)[im_inds, loc_inds]


@dataclass
class FCOSOutputs:
    """Everything FCOS computed for a batch; what a mask head receives.

    Per level (lists of L tensors):
        logits (N, K, Hl, Wl), bbox_reg (N, 4, Hl, Wl) (distances / stride),
        ctrness (N, 1, Hl, Wl), locations (Hl * Wl, 2) (x, y) in input pixels,
        top_feats (N, D, Hl, Wl) or None (also None at inference when the top_module is a
            plain convolution: it is then evaluated at the detections only),
        cls_towers / bbox_towers (N, C, Hl, Wl) or None.
    strides: L ints.
    image_sizes: N (h, w) of the unpadded inputs.

    Training only:
        targets: :class:`FCOSTargets` of every location.
        positives: Instances (image size = padded batch size), one row per positive
            location (P rows), ordered by image then location, with fields
              im_inds (P,)         image index in the batch
              loc_inds (P,)        location index in [0, M) within the image
              fpn_levels (P,)      level index
              locations (P, 2)     (x, y) in input pixels
              gt_inds (P,)         matched instance, index into gt_instances[im_inds]
              gt_classes (P,)      its class
              reg_targets (P, 4)   (l, t, r, b) in pixels
              ctrness_targets (P,)
              logits_pred (P, K), reg_pred (P, 4) (/ stride), ctrness_pred (P,)
              top_feats (P, D)     when a top_module was given
        losses: {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}.

    Inference (and training with ``MODEL.FCOS.YIELD_PROPOSAL``):
        detections: N Instances (at the input resolution, before rescaling to the
            original image) with pred_boxes, scores, pred_classes, locations (P, 2),
            fpn_levels, loc_inds and top_feats (when a top_module was given).
    """

    logits: List[Tensor]
    bbox_reg: List[Tensor]
    ctrness: List[Tensor]
    locations: List[Tensor]
    strides: List[int]
    image_sizes: List
    top_feats: Optional[List[Tensor]] = None
    cls_towers: Optional[List[Tensor]] = None
    bbox_towers: Optional[List[Tensor]] = None
    targets: Optional[FCOSTargets] = None
    positives: Optional[Instances] = None
    losses: Dict[str, Tensor] = field(default_factory=dict)
    detections: Optional[List[Instances]] = None


@PROPOSAL_GENERATOR_REGISTRY.register()
class FCOS(nn.Module):
    """FCOS head + target assignment + losses + inference on a set of FPN levels."""

    @configurable
    def __init__(
        self,
        *,
        head: FCOSHead,
        in_features: List[str],
        strides: List[int],
        sizes_of_interest: List[float],
        num_classes: int,
        center_sampling_radius: float = 1.5,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        loc_loss_type: str = "giou",
        loc_loss_iou_smooth: float = 0.0,
        clip_before_nms: bool = True,
        score_thresh_train: float = 0.05,
        score_thresh_test: float = 0.05,
        pre_nms_topk_train: int = 1000,
        pre_nms_topk_test: int = 1000,
        post_nms_topk_train: int = 100,
        max_detections_per_image: int = 100,
        nms_thresh: float = 0.6,
        thresh_with_ctr: bool = False,
        yield_proposal: bool = False,
        yield_towers: bool = False,
    ):
        """
        Args:
            head: the :class:`FCOSHead` (attribute name ``fcos_head``, as in AdelaiDet).
            in_features: names of the L FPN levels used, e.g. ["p3", ..., "p7"].
            strides: their L strides.
            sizes_of_interest: L-1 upper bounds of max(l, t, r, b) per level.
            num_classes: K.
            center_sampling_radius: central sampling radius in strides; 0 disables it.
            Others: loss and inference settings (see ``MODEL.FCOS`` in config.py).
        """
        super().__init__()
        if len(in_features) != len(strides):
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES has {len(in_features)} levels but "
                f"MODEL.FCOS.FPN_STRIDES has {len(strides)} strides."
            )
        self.fcos_head = head
        self.in_features = list(in_features)
        self.strides = [int(s) for s in strides]
        self.size_ranges = size_ranges_from_sizes_of_interest(sizes_of_interest, len(strides))
        self.num_classes = num_classes
        self.center_sampling_radius = center_sampling_radius
        self.loss = FCOSLoss(num_classes, focal_loss_alpha, focal_loss_gamma, loc_loss_type,
                             loc_loss_iou_smooth)
        self.clip_before_nms = clip_before_nms
        self.score_thresh_train = score_thresh_train
        self.score_thresh_test = score_thresh_test
        self.pre_nms_topk_train = pre_nms_topk_train
        self.pre_nms_topk_test = pre_nms_topk_test
        self.post_nms_topk_train = post_nms_topk_train
        self.max_detections_per_image = max_detections_per_image
        self.nms_thresh = nms_thresh
        self.thresh_with_ctr = thresh_with_ctr
        self.yield_proposal = yield_proposal
        self.yield_towers = yield_towers

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        f = cfg.MODEL.FCOS
        missing = [name for name in f.IN_FEATURES if name not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES {missing} are not produced by the backbone "
                f"(it gives {sorted(input_shape)})."
            )
        shapes = [input_shape[name] for name in f.IN_FEATURES]
        channels = {s.channels for s in shapes}
        if len(channels) != 1:
            raise ValueError(f"FCOS needs the same channels on every level, got {channels}.")
        for name, s, stride in zip(f.IN_FEATURES, shapes, f.FPN_STRIDES):
            if s.stride is not None and s.stride != stride:
                raise ValueError(
                    f"MODEL.FCOS.FPN_STRIDES gives {stride} for {name}, the backbone {s.stride}."
                )
        head = FCOSHead(
            in_channels=channels.pop(),
            num_classes=f.NUM_CLASSES,
            num_levels=len(f.IN_FEATURES),
            num_cls_convs=f.NUM_CLS_CONVS,
            num_box_convs=f.NUM_BOX_CONVS,
            num_share_convs=f.NUM_SHARE_CONVS,
            norm=f.NORM,
            use_scale=f.USE_SCALE,
            use_deformable=f.USE_DEFORMABLE,
            prior_prob=f.PRIOR_PROB,
        )
        return {
            "head": head,
            "in_features": f.IN_FEATURES,
            "strides": f.FPN_STRIDES,
            "sizes_of_interest": f.SIZES_OF_INTEREST,
            "num_classes": f.NUM_CLASSES,
            "center_sampling_radius": f.POS_RADIUS if f.CENTER_SAMPLE else 0.0,
            "focal_loss_alpha": f.LOSS_ALPHA,
            "focal_loss_gamma": f.LOSS_GAMMA,
            "loc_loss_type": f.LOC_LOSS_TYPE,
            "loc_loss_iou_smooth": f.LOC_LOSS_IOU_SMOOTH,
            "clip_before_nms": f.CLIP_BEFORE_NMS,
            "score_thresh_train": f.INFERENCE_TH_TRAIN,
            "score_thresh_test": f.INFERENCE_TH_TEST,
            "pre_nms_topk_train": f.PRE_NMS_TOPK_TRAIN,
            "pre_nms_topk_test": f.PRE_NMS_TOPK_TEST,
            "post_nms_topk_train": f.POST_NMS_TOPK_TRAIN,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "nms_thresh": f.NMS_TH,
            "thresh_with_ctr": f.THRESH_WITH_CTR,
            "yield_proposal": f.YIELD_PROPOSAL,
            "yield_towers": f.YIELD_BOX_FEATURES,
        }

    def compute_locations(self, features: List[Tensor]) -> List[Tensor]:
        """L tensors (Hl * Wl, 2) of (x, y) for the given L feature maps."""
        return [
            compute_locations(x.shape[-2], x.shape[-1], s, x.device)
            for x, s in zip(features, self.strides)
        ]

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        gt_instances: Optional[List[Instances]] = None,
        top_module: Optional[nn.Module] = None,
    ) -> FCOSOutputs:
        """
        Args:
            images: the batch (only sizes are used).
            features: backbone outputs by name; ``in_features`` are used.
            gt_instances: N Instances with gt_boxes, gt_classes (training).
            top_module: optional (N, C, Hl, Wl) -> (N, D, Hl, Wl) module applied on the
                box tower of every level (a mask method's per-location head).
        Returns:
            :class:`FCOSOutputs` (losses and positives in training, detections at test).
        """
        feats = [features[name] for name in self.in_features]
        # At inference a plain convolution as top_module runs only at the final detections
        # (their top_feats are all that is used), not on every location of every level.
        top_at_detections = (not self.training and top_module is not None
                             and supports_conv2d_at_locations(top_module))
        head_out = self.fcos_head(feats, top_module=None if top_at_detections else top_module,
                                  yield_towers=self.yield_towers or top_at_detections)
        out = FCOSOutputs(
            logits=head_out.logits,
            bbox_reg=head_out.bbox_reg,
            ctrness=head_out.ctrness,
            locations=self.compute_locations(feats),
            strides=self.strides,
            image_sizes=list(images.image_sizes),
            top_feats=head_out.top_feats,
            cls_towers=head_out.cls_towers if self.yield_towers else None,
            bbox_towers=head_out.bbox_towers if self.yield_towers else None,
        )
        if self.training:
            if gt_instances is None:
                raise ValueError("FCOS in training mode needs gt_instances.")
            self._losses(out, gt_instances, tuple(images.tensor.shape[-2:]))
            if self.yield_proposal:
                with torch.no_grad():
                    out.detections = self.predict(out, training=True)
        else:
            out.detections = self.predict(out)
            if top_at_detections:
                for i, det in enumerate(out.detections):
                    det.top_feats = self.top_feats_at(top_module, head_out.bbox_towers, i, det)
        return out

    def top_feats_at(self, top_module: nn.Module, bbox_towers: List[Tensor], image: int,
                     det: Instances) -> Tensor:
        """(R, D) ``top_module`` (a convolution, see :func:`supports_conv2d_at_locations`)
        applied on the box towers at the R detections ``det`` of image ``image`` (its
        ``fpn_levels`` and ``loc_inds``): the values the full maps hold there."""
        out = bbox_towers[0].new_empty((len(det), top_module.out_channels))
        offset = 0
        for lvl, tower in enumerate(bbox_towers):
            h, w = tower.shape[-2:]
            sel = (det.fpn_levels == lvl).nonzero()[:, 0]
            if sel.numel():
                idx = det.loc_inds[sel] - offset
                out[sel] = conv2d_at_locations(top_module, tower[image], idx // w, idx % w)
            offset += h * w
        return out

    def _losses(self, out: FCOSOutputs, gt_instances: List[Instances], batch_hw) -> None:
        targets = assign_targets(
            out.locations,
            self.strides,
            self.size_ranges,
            gt_instances,
            self.num_classes,
            self.center_sampling_radius,
        )
        logits = flatten_levels(out.logits)  # (N, M, K)
        reg_pred = flatten_levels(out.bbox_reg)  # (N, M, 4), / stride
        ctr_pred = flatten_levels(out.ctrness)[..., 0]  # (N, M)
        # Regression targets in stride units, like the predictions.
        reg_targets = targets.reg_targets / targets.strides[None, :, None]
        out.targets = targets
        out.losses = self.loss(logits, reg_pred, ctr_pred, targets.labels, reg_targets)

        im_inds, loc_inds = (targets.labels < self.num_classes).nonzero(as_tuple=True)
        pos = Instances(batch_hw)
        pos.im_inds = im_inds
        pos.loc_inds = loc_inds
        pos.fpn_levels = targets.fpn_levels[loc_inds]
        pos.locations = targets.locations[loc_inds]
        pos.gt_inds = targets.gt_inds[im_inds, loc_inds]
        pos.gt_classes = targets.labels[im_inds, loc_inds]
        pos.reg_targets = targets.reg_targets[im_inds, loc_inds]
        pos.ctrness_targets = ctrness_targets(pos.reg_targets)
        pos.logits_pred = logits[im_inds, loc_inds]
        pos.reg_pred = reg_pred[im_inds, loc_inds]
        pos.ctrness_pred = ctr_pred[im_inds, loc_inds]
        if out.top_feats is not None:
            pos.top_feats = flatten_levels(out.top_feats)[im_inds, loc_inds]
        out.positives = pos

    def predict(self, out: FCOSOutputs, training: bool = False) -> List[Instances]:
        """Detections per image from :class:`FCOSOutputs` (see its ``detections``)."""
        results = []
        for i, image_size in enumerate(out.image_sizes):
            per_level = lambda maps: [m[i].permute(1, 2, 0).reshape(-1, m.shape[1]) for m in maps]  # noqa: E731
            extras = {"top_feats": per_level(out.top_feats)} if out.top_feats is not None else None
            results.append(
                fcos_inference_single_image(
                    per_level(out.logits),
                    per_level(out.bbox_reg),
                    [c[:, 0] for c in per_level(out.ctrness)],
                    out.locations,
                    out.strides,
                    tuple(image_size),
                    score_thresh=self.score_thresh_train if training else self.score_thresh_test,
                    pre_nms_topk=self.pre_nms_topk_train if training else self.pre_nms_topk_test,
                    nms_thresh=self.nms_thresh,
                    max_detections=(
                        self.post_nms_topk_train if training else self.max_detections_per_image
                    ),
                    thresh_with_ctr=self.thresh_with_ctr,
                    clip_before_nms=self.clip_before_nms,
                    extras=extras,
                )
            )
        return results
