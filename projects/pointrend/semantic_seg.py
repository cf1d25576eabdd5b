"""PointRend for semantic segmentation (paper, section 5): a coarse semantic head (Semantic
FPN's, or DeepLabV3's) refined by the point head up to the input resolution.

Shape shorthand:
    B: images, K: classes, C: fine-grained channels, P: points per image
    h, w: coarse prediction size (input / COMMON_STRIDE), H, W: padded input size

Training: the coarse head's own loss, plus cross-entropy of the point head at
SEM_SEG.TRAIN_NUM_POINTS points per image chosen by the biased sampler (k, beta) with the
semantic uncertainty (second best minus best logit).
Inference: subdivision from (h, w) until (H, W) (SEM_SEG.SUBDIVISION_STEPS = -1) with
SEM_SEG.SUBDIVISION_NUM_POINTS points per step.
"""
import math
from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, SemanticSegmentor
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from d2seg.layers.inference_speed import fold_frozen_batchnorm, to_inference_layout

from .point_head import build_pointrend_point_head
from .point_ops import point_sample
from .point_selection import sample_training_points
from .subdivision import semantic_uncertainty, subdivide

__all__ = ["D2SegPointRendSemSegHead", "D2SegSemanticSegmentor", "coarse_semantic_logits", "semantic_output"]


def coarse_semantic_logits(head: nn.Module, features: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K, h, w) logits of a Detectron2 semantic head at its own output stride."""
    if hasattr(head, "layers"):  # SemSegFPNHead
        return head.layers(features)
    if hasattr(head, "aspp") and hasattr(head, "predictor"):  # DeepLabV3Head
        return head.predictor(head.aspp(features[head.in_features[0]]))
    raise TypeError(
        f"MODEL.POINTREND.SEM_SEG.COARSE_HEAD_NAME: {type(head).__name__} has neither layers() "
        "(SemSegFPNHead) nor aspp + predictor (DeepLabV3Head)"
    )


@SEM_SEG_HEADS_REGISTRY.register()
class D2SegPointRendSemSegHead(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        coarse_sem_seg_head: nn.Module,
        point_head: nn.Module,
        in_features,
        feature_strides: Dict[str, int],
        ignore_value: int = 255,
        train_num_points: int = 2048,
        oversample_ratio: float = 3,
        importance_sample_ratio: float = 0.75,
        subdivision_steps: int = -1,
        subdivision_num_points: int = 8096,
    ):
        """
        Args:
            coarse_sem_seg_head: a Detectron2 semantic head (layers()/losses()).
            point_head: d2seg point head (fine channels = sum over in_features).
            in_features: fine-grained maps (P2 for Semantic FPN, res2 for DeepLabV3).
            subdivision_steps: 2x steps at inference; -1: until the input resolution.
        """
        super().__init__()
        self.coarse_sem_seg_head = coarse_sem_seg_head
        self.point_head = point_head
        self.in_features = list(in_features)
        self.feature_strides = feature_strides
        self.ignore_value = ignore_value
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.subdivision_steps = subdivision_steps
        self.subdivision_num_points = subdivision_num_points

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        pr = cfg.MODEL.POINTREND
        name = pr.SEM_SEG.COARSE_HEAD_NAME
        if name not in SEM_SEG_HEADS_REGISTRY or name == "D2SegPointRendSemSegHead":
            raise KeyError(f"MODEL.POINTREND.SEM_SEG.COARSE_HEAD_NAME = {name!r} is not a semantic head")
        missing = [f for f in pr.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.POINTREND.IN_FEATURES names {missing}; backbone gives {sorted(input_shape)}")
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        channels = sum(input_shape[f].channels for f in pr.IN_FEATURES)
        return {
            "coarse_sem_seg_head": SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape),
            "point_head": build_pointrend_point_head(cfg, channels, num_classes),
            "in_features": pr.IN_FEATURES,
            "feature_strides": {k: v.stride for k, v in input_shape.items()},
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "train_num_points": pr.SEM_SEG.TRAIN_NUM_POINTS,
            "oversample_ratio": pr.OVERSAMPLE_RATIO,
            "importance_sample_ratio": pr.IMPORTANCE_SAMPLE_RATIO,
            "subdivision_steps": pr.SEM_SEG.SUBDIVISION_STEPS,
            "subdivision_num_points": pr.SEM_SEG.SUBDIVISION_NUM_POINTS,
        }

    def _input_size(self, features):
        f = self.in_features[0]
        s = self.feature_strides[f]
        return features[f].shape[-2] * s, features[f].shape[-1] * s

    def _fine(self, features, points, maps=None):
        maps = maps if maps is not None else [features[f] for f in self.in_features]
        out = [point_sample(m, points) for m in maps]
        return out[0] if len(out) == 1 else cat(out, dim=1)

    def forward(self, features: Dict[str, torch.Tensor], targets: torch.Tensor = None):
        """
        Args:
            features: backbone maps, (B, C, H/s, W/s) each.
            targets: (B, H, W) long class map (training), IGNORE_VALUE ignored.

        Returns:
            training: (None, losses); inference: ((B, K, H, W) logits, {}).
        """
        coarse = coarse_semantic_logits(self.coarse_sem_seg_head, features)
        if self.training:
            losses = self.coarse_sem_seg_head.losses(coarse, targets)
            with torch.no_grad():
                points = sample_training_points(
                    coarse, semantic_uncertainty, self.train_num_points,
                    self.oversample_ratio, self.importance_sample_ratio,
                )
                point_targets = self._nearest_targets(targets, points)
            logits = self.point_head(self._fine(features, points), point_sample(coarse, points))
            losses["loss_sem_seg_point"] = F.cross_entropy(
                logits, point_targets, reduction="mean", ignore_index=self.ignore_value
            )
            return None, losses
        return self.inference(features, coarse), {}

    @staticmethod
    def _nearest_targets(targets, points):
        """(B, H, W) labels at (B, P, 2) points -> (B, P), nearest pixel."""
        B, H, W = targets.shape
        x = (points[..., 0] * W).long().clamp_(0, W - 1)
        y = (points[..., 1] * H).long().clamp_(0, H - 1)
        return targets.reshape(B, H * W).gather(1, y * W + x)

    def inference(self, features, coarse):
        H, W = self._input_size(features)
        steps = self.subdivision_steps
        if steps < 0:
            steps = max(0, math.ceil(math.log2(max(H / coarse.shape[-2], W / coarse.shape[-1]))))
        B = coarse.shape[0]
        positions = sum(features[f].shape[0] * features[f].shape[2] * features[f].shape[3] for f in self.in_features)
        projected = B * steps * self.subdivision_num_points > positions
        maps = None
        if projected:
            w, start, maps = self.point_head._split(0)[0], 0, []
            for f in self.in_features:
                c = features[f].shape[1]
                maps.append(F.conv2d(features[f], w[:, start:start + c, None, None]))
                start += c

        def predict(points):
            return self.point_head(self._fine(features, points, maps), point_sample(coarse, points),
                                   fine_is_projected=projected)

        logits = subdivide(coarse, predict, steps, self.subdivision_num_points, semantic_uncertainty)
        if logits.shape[-2:] != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return logits


def semantic_output(logits: torch.Tensor, image_size, height: int, width: int) -> torch.Tensor:
    """(K, Hp, Wp) logits of one padded image -> (K, height, width): the image's part, resized
    bilinearly to the output size, as Detectron2's ``sem_seg_postprocess``, except that an image
    already at its output size is not resized (a bilinear resize to the same size returns every
    value unchanged, after a full pass over K x H x W)."""
    logits = logits[:, : image_size[0], : image_size[1]]
    if (height, width) == tuple(image_size):
        return logits.contiguous()
    return F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]


@META_ARCH_REGISTRY.register()
class D2SegSemanticSegmentor(SemanticSegmentor):
    """Detectron2's ``SemanticSegmentor``: the same parameters, checkpoints, training and
    outputs. At inference it skips the resize of logits already at their output size
    (:func:`semantic_output`) and, with ``MODEL.FAST_INFERENCE`` (d2seg.layers.inference_speed),
    runs the backbone's FrozenBN layers folded into their convolutions on a channels-last
    image (results then change by float rounding: docs/benchmark.md, "Inference speed-ups at
    parity")."""

    @configurable
    def __init__(self, *, fast_inference: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.fast_inference = bool(fast_inference)
        if self.fast_inference:
            fold_frozen_batchnorm(self.backbone)

    @classmethod
    def from_config(cls, cfg):
        return dict(super().from_config(cfg), fast_inference=cfg.MODEL.FAST_INFERENCE)

    def forward(self, batched_inputs):
        """Training: Detectron2's ``SemanticSegmentor.forward`` (the losses). Inference: a list
        of {"sem_seg": (K, height, width) logits} per input dict ("image" (3, H, W), optional
        "height", "width" of the output)."""
        if self.training:
            return super().forward(batched_inputs)
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility,
                                        padding_constraints=self.backbone.padding_constraints)
        x = to_inference_layout(images.tensor, self.training) if self.fast_inference else images.tensor
        results, _ = self.sem_seg_head(self.backbone(x), None)
        out = []
        for logits, inp, size in zip(results, batched_inputs, images.image_sizes):
            out.append({"sem_seg": semantic_output(logits, size, inp.get("height", size[0]),
                                                   inp.get("width", size[1]))})
        return out
