"""SOLO's inference on one image: candidates from the category grids, their masks,
maskness rescoring, NMS on masks, and pasting at the output size.

Shape shorthand:
    C: classes         S: a level's grid size       K: candidate (cell, class) pairs
    hc, wc: the common mask resolution the candidates are compared at (the finest
        level's mask size, stride 4 with the papers' settings)
    Hp, Wp: padded input size    H, W: output size
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from d2seg.layers.mask_boxes import masks_to_boxes
from d2seg.layers.mask_resize import resize_and_threshold
from d2seg.layers.matrix_nms import mask_nms, matrix_nms

__all__ = ["InferenceParams", "point_nms", "empty_instances", "postprocess_candidates"]


@dataclass
class InferenceParams:
    score_thr: float = 0.1
    mask_thr: float = 0.5
    nms_pre: int = 500
    max_per_img: int = 100
    nms_type: str = "mask"
    nms_iou_thr: float = 0.5
    nms_kernel: str = "gaussian"
    nms_sigma: float = 2.0
    update_thr: float = 0.05

    def __post_init__(self):
        if self.nms_type not in ("mask", "matrix"):
            raise ValueError(f"MODEL.SOLO.NMS_TYPE must be 'mask' or 'matrix', got {self.nms_type!r}")


def point_nms(heat, kernel=2):
    """Keeps a cell's score only where it is the maximum of its 2x2 neighbourhood.

    Args:
        heat (Tensor): (N, C, S, S) probabilities.
    Returns:
        Tensor: (N, C, S, S), zero where suppressed.
    """
    hmax = F.max_pool2d(heat, kernel, stride=1, padding=1)
    hmax = hmax[..., : heat.shape[-2], : heat.shape[-1]]
    return heat * (hmax == heat).to(heat.dtype)


def empty_instances(out_size, device):
    """Instances with zero detections (every field present, with 0 rows)."""
    r = Instances(out_size)
    r.scores = torch.zeros(0, device=device)
    r.pred_classes = torch.zeros(0, dtype=torch.long, device=device)
    r.pred_masks = torch.zeros((0,) + tuple(out_size), dtype=torch.bool, device=device)
    r.pred_boxes = Boxes(torch.zeros((0, 4), device=device))
    return r


def postprocess_candidates(probs, scores, classes, min_areas, params, image_size, padded_size,
                           out_size):
    """From scored candidate masks to the final Instances of one image.

    Args:
        probs (Tensor): (K, hc, wc) mask probabilities of the candidates.
        scores (Tensor): (K,) category scores.
        classes (Tensor): (K,) long classes.
        min_areas (Tensor): (K,) a candidate's binary mask must cover more than this many
            pixels at (hc, wc) (its level's stride, as in SOLO's code).
        params (InferenceParams): thresholds and NMS settings.
        image_size (tuple): (h, w) of the image inside the padded input.
        padded_size (tuple): (Hp, Wp).
        out_size (tuple): (H, W) requested output size.
    Returns:
        Instances: ``pred_masks`` (R, H, W) bool, ``scores``, ``pred_classes``,
        ``pred_boxes`` (boxes of the masks).
    """
    device = probs.device
    binary = probs > params.mask_thr
    areas = binary.flatten(1).sum(dim=1).float()
    kept = torch.nonzero(areas > min_areas).flatten()
    if len(kept) == 0:
        return empty_instances(out_size, device)
    # Maskness: mean probability inside the binary mask (computed for every candidate, used
    # for the kept ones: the (K, hc, wc) masks are gathered once, after the ranking).
    maskness = (probs * binary).flatten(1).sum(dim=1) / areas
    scores, classes = (scores * maskness)[kept], classes[kept]

    order = torch.argsort(scores, descending=True)[: params.nms_pre]
    sel = kept[order]
    probs, binary, areas = probs[sel], binary[sel], areas[sel]
    scores, classes = scores[order], classes[order]
    if params.nms_type == "matrix":
        scores = matrix_nms(binary, classes, scores, kernel=params.nms_kernel,
                            sigma=params.nms_sigma, areas=areas)
        keep = torch.nonzero(scores >= params.update_thr).flatten()
    else:
        keep = mask_nms(binary, classes, scores, iou_threshold=params.nms_iou_thr, areas=areas)
    if len(keep) == 0:
        return empty_instances(out_size, device)
    scores, classes = scores[keep], classes[keep]
    order = torch.argsort(scores, descending=True)[: params.max_per_img]
    probs, scores, classes = probs[keep[order]], scores[order], classes[order]

    h, w = image_size

    def resize(chunk):  # (r, Hm, Wm) -> (r, H, W): to the padded input, cropped, to the output
        full = F.interpolate(chunk[None], size=tuple(padded_size), mode="bilinear",
                             align_corners=False)[:, :, :h, :w]
        if tuple(out_size) != (h, w):
            full = F.interpolate(full, size=tuple(out_size), mode="bilinear", align_corners=False)
        return full[0]

    # a few masks at a time: a large photo never holds the float masks of every detection
    masks = resize_and_threshold(probs, resize, params.mask_thr)
    r = Instances(tuple(out_size))
    r.pred_masks = masks
    r.scores = scores
    r.pred_classes = classes
    r.pred_boxes = masks_to_boxes(masks)
    return r
