"""PointINS mask targets and loss: BCE with the target's edge pixels weighted (paper eq. 9).

Shape shorthand in this module:
    S: sampled positives, M = 2K: side of the predicted mask, G: instances of an image
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.structures import Instances

__all__ = ["mask_targets", "edge_pixels", "edge_weighted_bce"]


def mask_targets(
    gt_instances: List[Instances], im_inds: Tensor, gt_inds: Tensor, boxes: Tensor, mask_size: int
) -> Tensor:
    """Each positive's ground-truth mask cropped to its target box and resized, as in Mask
    R-CNN (the predicted mask is relative to the box it is pasted into).

    Args:
        gt_instances: N Instances with ``gt_masks`` (BitMasks or PolygonMasks).
        im_inds, gt_inds: (S,) image of each positive and its GT index in that image.
        boxes: (S, 4) XYXY target boxes in input pixels.
        mask_size: M.
    Returns:
        (S, M, M) float in {0, 1}.
    """
    out = boxes.new_zeros((len(boxes), mask_size, mask_size))
    for i in torch.unique(im_inds).tolist():
        inst = gt_instances[i]
        if not inst.has("gt_masks"):
            raise ValueError(
                "PointINS needs instance masks ('gt_masks') in training: set MODEL.MASK_ON: True "
                "so that the dataset mapper loads them."
            )
        sel = (im_inds == i).nonzero(as_tuple=True)[0]
        masks = inst.gt_masks[gt_inds[sel]]
        out[sel] = masks.crop_and_resize(boxes[sel].detach(), mask_size).to(out.device, out.dtype)
    return out


def edge_pixels(targets: Tensor) -> Tensor:
    """(S, M, M) bool: pixels whose 3x3 neighbourhood (inside the mask) holds both 0 and 1."""
    if targets.numel() == 0:
        return targets.bool()
    t = targets[:, None].float()
    dilated = F.max_pool2d(t, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-t, 3, stride=1, padding=1)
    return (dilated != eroded)[:, 0]


def edge_weighted_bce(logits: Tensor, targets: Tensor, edge_weight: float = 4.0) -> Tensor:
    """Weighted mean over pixels of BCE(logits, targets), with weight ``edge_weight`` on
    the edge pixels of the target and 1 elsewhere.

    Args:
        logits: (S, M, M) mask logits.
        targets: (S, M, M) binary targets.
    Returns:
        scalar; ``logits.sum() * 0`` when S = 0 (keeps the graph connected).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ.")
    if logits.numel() == 0:
        return logits.sum() * 0.0
    weights = torch.ones_like(targets)
    weights[edge_pixels(targets)] = float(edge_weight)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * weights).sum() / weights.sum()
