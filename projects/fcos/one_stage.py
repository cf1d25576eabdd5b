"""OneStageDetector: backbone (FPN) + a dense one-stage detector (FCOS) + an optional
mask head that works on FCOS's per-location outputs. The base of PointINS, MEInst,
CondInst and BlendMask in d2seg.

Shape shorthand in this module:
    N: images, L: FPN levels, Hl, Wl: size of level l, C: FPN channels,
    D: channels of the mask head's ``top_module`` output, P: positive locations

Extension points (see docs/fcos.md):
  1. A mask head, registered in :data:`ONE_STAGE_MASK_HEAD_REGISTRY` and selected with
     ``MODEL.ONE_STAGE_MASK_HEAD.NAME``, subclassing :class:`OneStageMaskHead`:
       * ``prepare_targets(images, gt_instances)`` (optional) runs in training before FCOS
         assigns its targets, e.g. to set ``gt_centers`` for central sampling;
       * ``top_module`` (optional nn.Module, (N, C, Hl, Wl) -> (N, D, Hl, Wl)) runs on the
         box tower of every level; its output arrives per positive location
         (``fcos_outputs.positives.top_feats``) and per detection (``top_feats``);
       * ``losses(images, features, fcos_outputs, gt_instances)`` -> dict of losses,
         computed on ``fcos_outputs.positives`` (im_inds, gt_inds, fpn_levels, locations...);
       * ``inference(images, features, fcos_outputs, detections)`` -> detections with the
         mask fields added (run on the final FCOS detections, before rescaling);
       * ``postprocess(result, output_height, output_width)`` -> result at the original
         image size (default: Detectron2's ``detector_postprocess``).
  2. Subclassing :class:`OneStageDetector` (override ``from_config`` to build other parts,
     or ``forward_mask`` / ``postprocess``) when a method needs more than a mask head.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_proposal_generator
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.registry import Registry

from d2seg.layers.inference_speed import fold_frozen_batchnorm, to_inference_layout

from .fcos import FCOSOutputs

__all__ = [
    "ONE_STAGE_MASK_HEAD_REGISTRY",
    "OneStageMaskHead",
    "build_one_stage_mask_head",
    "OneStageDetector",
]

ONE_STAGE_MASK_HEAD_REGISTRY = Registry("ONE_STAGE_MASK_HEAD")
ONE_STAGE_MASK_HEAD_REGISTRY.__doc__ = """
Mask heads on top of FCOS for :class:`OneStageDetector`. Called as ``obj(cfg, input_shape)``
where input_shape maps backbone feature names to ShapeSpec. Subclass OneStageMaskHead.
"""


class OneStageMaskHead(nn.Module):
    """Interface of a mask head attached to :class:`OneStageDetector` (see module doc).

    Subclasses call ``super().__init__()``, then may set ``self.top_module`` to an
    nn.Module (it stays None otherwise), and implement :meth:`losses` and :meth:`inference`.
    """

    def __init__(self):
        super().__init__()
        self.top_module: Optional[nn.Module] = None

    def prepare_targets(self, images: ImageList, gt_instances: List[Instances]) -> None:
        """Training, before FCOS assigns targets: add fields to ``gt_instances`` in place
        (e.g. ``gt_centers``, read by FCOS's central sampling). Default: nothing."""

    def losses(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        fcos_outputs: FCOSOutputs,
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        """Mask losses from the positives of ``fcos_outputs`` and the ground truth."""
        raise NotImplementedError

    def inference(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        fcos_outputs: FCOSOutputs,
        detections: List[Instances],
    ) -> List[Instances]:
        """Add masks (e.g. ``pred_masks``) to the N per-image detections."""
        raise NotImplementedError

    def postprocess(self, result: Instances, output_height: int, output_width: int) -> Instances:
        """Rescale one image's result from input to original resolution."""
        return detector_postprocess(result, output_height, output_width)


def build_one_stage_mask_head(cfg, input_shape: Dict[str, ShapeSpec]) -> Optional[OneStageMaskHead]:
    """The mask head named by ``MODEL.ONE_STAGE_MASK_HEAD.NAME``, or None if empty."""
    name = cfg.MODEL.ONE_STAGE_MASK_HEAD.NAME
    if not name:
        return None
    if name not in ONE_STAGE_MASK_HEAD_REGISTRY:
        raise KeyError(
            f"MODEL.ONE_STAGE_MASK_HEAD.NAME={name!r} is not registered; known: "
            f"{sorted(k for k, _ in ONE_STAGE_MASK_HEAD_REGISTRY)}."
        )
    return ONE_STAGE_MASK_HEAD_REGISTRY.get(name)(cfg, input_shape)


@META_ARCH_REGISTRY.register()
class OneStageDetector(nn.Module):
    """Backbone + ``proposal_generator`` (FCOS) + optional ``mask_head``.

    Attribute names follow AdelaiDet's OneStageDetector (``backbone``,
    ``proposal_generator``), so checkpoint keys read ``proposal_generator.fcos_head.*``.
    Input/output: Detectron2's list[dict] format; outputs ``[{"instances": Instances}]``
    with pred_boxes, scores, pred_classes (plus the mask head's fields).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        mask_head: Optional[OneStageMaskHead] = None,
        pixel_mean,
        pixel_std,
        fast_inference: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        # MODEL.FAST_INFERENCE: inference-only speed-ups (d2seg.layers.inference_speed)
        self.fast_inference = bool(fast_inference)
        if self.fast_inference:
            fold_frozen_batchnorm(self.backbone)
        self.proposal_generator = proposal_generator
        self.mask_head = mask_head
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if self.pixel_mean.shape != self.pixel_std.shape:
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length.")

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, shapes),
            "mask_head": build_one_stage_mask_head(cfg, shapes),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "fast_inference": cfg.MODEL.FAST_INFERENCE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: Detectron2 inputs: "image" (C, H, W) and, in training,
                "instances" (gt_boxes, gt_classes, optionally gt_masks); optional
                "height"/"width" of the output at inference.
        Returns:
            training: dict of losses; inference: list of {"instances": Instances}.
        """
        images = self.preprocess_image(batched_inputs)
        x = to_inference_layout(images.tensor, self.training) if self.fast_inference else images.tensor
        features = self.backbone(x)
        top_module = getattr(self.mask_head, "top_module", None)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("OneStageDetector training needs 'instances' in every input dict.")
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            if self.mask_head is not None:
                self.mask_head.prepare_targets(images, gt_instances)
            outputs = self.proposal_generator(images, features, gt_instances, top_module=top_module)
            losses = dict(outputs.losses)
            losses.update(self.forward_mask(images, features, outputs, gt_instances))
            return losses

        outputs = self.proposal_generator(images, features, None, top_module=top_module)
        detections = self.forward_mask(images, features, outputs, None)
        return self.postprocess(detections, batched_inputs, images.image_sizes)

    def forward_mask(self, images, features, outputs: FCOSOutputs, gt_instances):
        """Mask losses (training) or detections with masks (inference)."""
        if self.training:
            if self.mask_head is None:
                return {}
            return self.mask_head.losses(images, features, outputs, gt_instances)
        if self.mask_head is None:
            return outputs.detections
        return self.mask_head.inference(images, features, outputs, outputs.detections)

    def postprocess(self, detections: List[Instances], batched_inputs, image_sizes):
        """Rescale each image's detections to the requested output size."""
        results = []
        for det, inp, size in zip(detections, batched_inputs, image_sizes):
            height = inp.get("height", size[0])
            width = inp.get("width", size[1])
            if self.mask_head is not None:
                r = self.mask_head.postprocess(det, height, width)
            else:
                r = detector_postprocess(det, height, width)
            results.append({"instances": r})
        return results
