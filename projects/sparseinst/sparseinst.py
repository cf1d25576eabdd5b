"""SparseInst meta-architecture: backbone -> instance context encoder -> IAM decoder;
bipartite-matching losses in training; threshold-only inference (no sorting, no NMS).

Shapes: B batch, N instances per image (NUM_MASKS), C classes, Hp x Wp the padded input,
Hm x Wm the mask output (Hp / 4 x Wp / 4 by default), R kept detections of one image.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList, Instances

from d2seg.layers.inference_speed import fold_frozen_batchnorm, to_inference_layout
from d2seg.layers.mask_boxes import masks_to_boxes  # noqa: F401  (also importable from here)
from d2seg.layers.mask_resize import resize_and_threshold

from .decoder import build_sparse_inst_decoder
from .encoder import build_sparse_inst_encoder
from .loss import SparseInstCriterion
from .matcher import image_extents


def rescored_probabilities(pred_logits: torch.Tensor, pred_scores: torch.Tensor) -> torch.Tensor:
    """p~ = sqrt(p * s): class probabilities rescored by the IoU-aware objectness.

    pred_logits: (..., N, C); pred_scores: (..., N, 1) -> (..., N, C).
    """
    return torch.sqrt(pred_logits.sigmoid() * pred_scores.sigmoid())


def maskness(mask_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean probability inside each binarised mask. (R, H, W) -> (R,)."""
    binary = (mask_probs > threshold).to(mask_probs.dtype)
    return (mask_probs * binary).flatten(1).sum(-1) / (binary.flatten(1).sum(-1) + 1e-6)


@META_ARCH_REGISTRY.register()
class SparseInst(nn.Module):
    """Detectron2 meta-architecture. Training input: dataset dicts with ``image`` and
    ``instances`` (``gt_classes``, ``gt_masks`` as BitMasks, or polygons converted here);
    output: the loss dict. Inference output: ``[{"instances": Instances}]`` with
    ``pred_masks`` (R, H, W) bool, ``pred_boxes`` (boxes of the masks), ``scores``,
    ``pred_classes`` at each image's original ``height`` x ``width``.
    """

    def __init__(self, cfg):
        super().__init__()
        si = cfg.MODEL.SPARSE_INST
        self.backbone = build_backbone(cfg)
        # MODEL.FAST_INFERENCE: inference-only speed-ups (d2seg.layers.inference_speed)
        self.fast_inference = bool(cfg.MODEL.FAST_INFERENCE)
        if self.fast_inference:
            fold_frozen_batchnorm(self.backbone)
        self.encoder = build_sparse_inst_encoder(cfg, self.backbone.output_shape())
        self.decoder = build_sparse_inst_decoder(cfg, self.encoder.out_channels)
        self.criterion = SparseInstCriterion.from_config(cfg)
        self.size_divisibility = max(int(self.backbone.size_divisibility or 0), 32)
        self.num_classes = si.DECODER.NUM_CLASSES
        self.cls_threshold = si.CLS_THRESHOLD
        self.mask_threshold = si.MASK_THRESHOLD
        self.mask_rescore = si.MASK_RESCORE
        self.max_detections = si.MAX_DETECTIONS
        self.mask_format = cfg.INPUT.MASK_FORMAT
        self.target_downsample = si.LOSS.TARGET_DOWNSAMPLE
        if self.target_downsample not in ("area", "bilinear"):
            raise ValueError(f"MODEL.SPARSE_INST.LOSS.TARGET_DOWNSAMPLE must be 'area' or 'bilinear', "
                             f"got {self.target_downsample!r}")
        if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD differ in length")
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        self.to(torch.device(cfg.MODEL.DEVICE))

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ network
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def predict(self, images: torch.Tensor, extents=None) -> Dict[str, torch.Tensor]:
        """Normalised, padded images (B, 3, Hp, Wp) -> the decoder's output dict. extents: the
        (height, width) fractions of the padded batch each image covers
        (:func:`~d2seg.sparseinst.matcher.image_extents`); None: every image fills it."""
        return self.decoder(self.encoder(self.backbone(images)), extents)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        x = to_inference_layout(images.tensor, self.training) if self.fast_inference else images.tensor
        # positions for the location prior and matching are relative to each image, not the batch
        extents = image_extents(images.image_sizes, images.tensor.shape[-2:])
        outputs = self.predict(x, extents)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("SparseInst training needs 'instances' in every dataset dict")
            gt_classes, gt_masks = self.prepare_targets(
                [x["instances"] for x in batched_inputs], images.tensor.shape[-2:], outputs["pred_masks"].shape[-2:]
            )
            return self.criterion(outputs, gt_classes, gt_masks, extents)
        return self.inference(outputs, batched_inputs, images)

    # ------------------------------------------------------------------ targets
    def prepare_targets(self, instances: List[Instances], padded_size, mask_size):
        """Per image: classes (K,) and masks (K, Hm, Wm) in [0, 1]: the bitmasks padded to the
        batch's padded size and downsampled to the mask output size (``LOSS.TARGET_DOWNSAMPLE``:
        area averaging, or bilinear as hustvl/SparseInst).
        """
        hp, wp = int(padded_size[0]), int(padded_size[1])
        classes, masks = [], []
        for inst in instances:
            h, w = inst.image_size
            cls = inst.gt_classes.to(self.device) if inst.has("gt_classes") else torch.zeros(0, dtype=torch.int64,
                                                                                           device=self.device)
            if len(cls) == 0:
                bm = torch.zeros(0, h, w, device=self.device)
            elif not inst.has("gt_masks"):
                raise ValueError("SparseInst needs gt_masks; set MODEL.MASK_ON True and annotate segmentations")
            else:
                gm = inst.gt_masks
                if not isinstance(gm, BitMasks):
                    if hasattr(gm, "polygons"):
                        gm = BitMasks.from_polygon_masks(gm.polygons, h, w)
                    else:
                        raise TypeError(f"gt_masks of type {type(gm).__name__} is not supported; use "
                                        "INPUT.MASK_FORMAT 'bitmask' or 'polygon'")
                bm = gm.tensor.to(self.device, torch.float32)
            padded = bm.new_zeros(bm.shape[0], hp, wp)
            padded[:, : bm.shape[1], : bm.shape[2]] = bm
            if bm.shape[0]:
                if self.target_downsample == "area":
                    padded = F.interpolate(padded[:, None], size=tuple(mask_size), mode="area")[:, 0]
                else:
                    padded = F.interpolate(padded[:, None], size=tuple(mask_size), mode="bilinear",
                                           align_corners=False)[:, 0]
            else:
                padded = padded.new_zeros(0, *mask_size)
            classes.append(cls)
            masks.append(padded)
        return classes, masks

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, outputs, batched_inputs, images: ImageList):
        probs = rescored_probabilities(outputs["pred_logits"], outputs["pred_scores"])  # (B, N, C)
        mask_probs = outputs["pred_masks"].sigmoid()  # (B, N, Hm, Wm)
        padded_size = images.tensor.shape[-2:]
        results = []
        for i, (p, m, image_size) in enumerate(zip(probs, mask_probs, images.image_sizes)):
            out_h = batched_inputs[i].get("height", image_size[0])
            out_w = batched_inputs[i].get("width", image_size[1])
            scores, labels = p.max(dim=-1)
            keep = scores > self.cls_threshold
            scores, labels, m = scores[keep], labels[keep], m[keep]
            if scores.numel() > self.max_detections:
                top = scores.topk(self.max_detections).indices
                scores, labels, m = scores[top], labels[top], m[top]
            result = Instances((out_h, out_w))
            if m.shape[0]:
                if self.mask_rescore:
                    scores = scores * maskness(m, self.mask_threshold)

                def resize(chunk):  # (r, Hm, Wm) -> (r, H, W): to the padded input, cropped, to the output
                    x = F.interpolate(chunk[:, None], size=padded_size, mode="bilinear", align_corners=False)
                    x = x[:, :, : image_size[0], : image_size[1]]
                    if (out_h, out_w) != tuple(image_size):  # (the same size would copy, unchanged)
                        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
                    return x[:, 0]

                # a few masks at a time: a large photo never holds every detection's float mask
                binary = resize_and_threshold(m, resize, self.mask_threshold)
            else:
                binary = torch.zeros(0, out_h, out_w, dtype=torch.bool, device=self.device)
            result.pred_masks = binary
            result.pred_boxes = masks_to_boxes(binary)
            result.scores = scores
            result.pred_classes = labels
            results.append({"instances": result})
        return results
