"""Bipartite matching between SparseInst's N predictions and an image's K ground truths
(paper Sec. 3.5, Eq. 1-2).

Shapes: N predictions, K ground-truth instances, P pixels of the mask output (Hm * Wm),
C classes, B images.

Positions (the location prior's grid cells, mask centroids) are measured relative to each
image's own extent, not to the padded batch: in a batch of mixed sizes an image covers
only the top-left part of the maps (:func:`image_extents`).
"""
import math
from typing import List, Optional, Tuple

import numpy as np
import torch


def dice_coefficient(pred_probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Pairwise DICE(m, t) = 2 sum(m t) / (sum(m^2) + sum(t^2)) (Eq. 2).

    pred_probs: (N, P) in [0, 1]; targets: (K, P) in [0, 1] -> (N, K). ``eps`` guards an
    empty pair (reference value).
    """
    numerator = 2.0 * pred_probs @ targets.t()
    denominator = (pred_probs * pred_probs).sum(-1)[:, None] + (targets * targets).sum(-1)[None, :]
    return numerator / (denominator + eps)


def matching_score(class_probs: torch.Tensor, gt_classes: torch.Tensor, pred_probs: torch.Tensor,
                   gt_masks: torch.Tensor, alpha: float = 0.8, beta: float = 0.2) -> torch.Tensor:
    """C(i, k) = p_{i, c_k}^beta * DICE(m_i, t_k)^alpha (Eq. 1, with beta = 1 - alpha in the paper).

    class_probs: (N, C) sigmoid probabilities; gt_classes: (K,) int64; pred_probs: (N, P);
    gt_masks: (K, P) -> (N, K).
    """
    p = class_probs[:, gt_classes]
    return p.pow(beta) * dice_coefficient(pred_probs, gt_masks).pow(alpha)


def grid_cell_centres(num_predictions: int, device=None) -> torch.Tensor:
    """(x, y) centres in [0, 1] of prediction i's cell on a ceil(sqrt(N))^2 grid (row-major):
    the cells of ``MODEL.SPARSE_INST.DECODER.IAM_LOCATION_PRIOR``. -> (N, 2)."""
    r = math.ceil(math.sqrt(num_predictions))
    idx = torch.arange(num_predictions, device=device)
    return torch.stack([(idx % r).float() + 0.5, (idx // r).float() + 0.5], dim=1) / r


def image_extents(image_sizes, padded_size) -> List[Tuple[float, float]]:
    """(height, width) fraction of the padded batch that each image covers: the image's own
    extent on every map of the batch (a map's cell i along y lies at (i + 0.5) / H /
    extent_h of the image's height). image_sizes: [(h, w)] per image; padded_size: (Hp, Wp)."""
    hp, wp = int(padded_size[0]), int(padded_size[1])
    return [(int(h) / hp, int(w) / wp) for h, w in image_sizes]


def normalised_centres(n: int, extent: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Positions in [0, 1] of an image (pixel centres) of the n cells of a map along one axis,
    the image covering the first ``extent`` fraction of the map (1: the whole map). -> (n,)."""
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) / n / extent


def mask_centroids(masks: torch.Tensor, hw, extent=(1.0, 1.0)) -> torch.Tensor:
    """(x, y) centroids in [0, 1] (pixel centres) of (K, H*W) soft masks, relative to the
    image covering ``extent`` = (height, width) fractions of the map (:func:`image_extents`);
    an empty mask gives the image's centre. -> (K, 2)."""
    h, w = int(hw[0]), int(hw[1])
    m = masks.float().view(-1, h, w)
    total = m.sum((1, 2)).clamp(min=1e-6)
    ys = normalised_centres(h, float(extent[0]), m.device, m.dtype)
    xs = normalised_centres(w, float(extent[1]), m.device, m.dtype)
    cx = (m.sum(1) * xs).sum(1) / total
    cy = (m.sum(2) * ys).sum(1) / total
    empty = m.sum((1, 2)) <= 0
    cx[empty], cy[empty] = 0.5, 0.5
    return torch.stack([cx, cy], dim=1)


def hungarian_match(score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Maximum-score one-to-one assignment of a (N, K) score matrix.

    Returns (pred_idx, gt_idx), each (min(N, K),) int64, sorted by pred_idx. A matrix with
    no columns (zero ground truths) gives two empty tensors.
    """
    if score.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    s = score.detach().float().cpu().numpy()
    if not np.isfinite(s).all():
        raise FloatingPointError("SparseInst matching score contains NaN/Inf; the predictions have diverged")
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize takes 0.2 s to import

    rows, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class SparseInstMatcher:
    """Matches each image's predictions to its ground truths with the dice-based score."""

    def __init__(self, alpha: float = 0.8, beta: float = 0.2, location_sigma: float = 0.0):
        self.alpha = alpha
        self.beta = beta
        if location_sigma < 0:
            raise ValueError(f"MODEL.SPARSE_INST.MATCHER.LOCATION_SIGMA must be >= 0 (0 = off), got {location_sigma}")
        self.location_sigma = float(location_sigma)

    @torch.no_grad()
    def __call__(self, pred_logits, pred_masks, gt_classes, gt_masks, mask_hw: Optional[Tuple[int, int]] = None,
                 extent: Tuple[float, float] = (1.0, 1.0)):
        """pred_logits: (N, C) class logits; pred_masks: (N, P) mask logits; gt_classes: (K,);
        gt_masks: (K, P) targets in [0, 1]; mask_hw: (Hm, Wm) with Hm * Wm = P, needed only
        with ``location_sigma``; extent: the (height, width) fractions of the map the image
        covers (:func:`image_extents`; (1, 1) unpadded). Returns (pred_idx, gt_idx) as in
        :func:`hungarian_match`.

        With ``location_sigma`` > 0 (d2seg's departure, off by default) the score is further
        multiplied by exp(-d^2 / (2 sigma^2)), d the distance between prediction i's grid
        cell (``grid_cell_centres``) and object k's mask centroid, both relative to the image.
        """
        if gt_classes.numel() == 0:
            return hungarian_match(pred_logits.new_zeros(pred_logits.shape[0], 0))
        score = matching_score(pred_logits.float().sigmoid(), gt_classes, pred_masks.float().sigmoid(),
                               gt_masks.float(), self.alpha, self.beta)
        if self.location_sigma > 0:
            if mask_hw is None:
                raise ValueError("MATCHER.LOCATION_SIGMA needs the mask size (mask_hw)")
            cells = grid_cell_centres(pred_logits.shape[0], score.device)
            d2 = torch.cdist(cells, mask_centroids(gt_masks, mask_hw, extent).to(cells)).pow(2)
            score = score * torch.exp(-d2 / (2.0 * self.location_sigma ** 2))
        return hungarian_match(score)
