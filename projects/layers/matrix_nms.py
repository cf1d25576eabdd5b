"""Non-maximum suppression on masks: Matrix NMS (SOLOv2) and hard mask NMS (SOLO).

Shape shorthand:
    N: number of candidate masks
    H, W: mask height and width (all candidates share one resolution)

Both work on binary masks of one image and take the candidates in any order; they sort
by score themselves and answer in the caller's order, so they can be dropped into any
method that scores masks (SOLO, CondInst, SparseInst, ...).

Matrix NMS (Wang et al., "SOLOv2", NeurIPS 2020) replaces the sequential "keep the best,
remove its overlaps" loop by one parallel soft suppression: a candidate j is decayed by
each higher-scored candidate i of the same class, by f(IoU_ij) / f(IoU_i*), where IoU_i*
is the largest IoU of i with any candidate scored above i (how much i is itself
suppressed), and j keeps the strongest (smallest) of these decays:

    decay_j = min(1, min_{i: s_i > s_j} f(IoU_ij) / f(IoU_i*))
    f(x) = exp(-sigma * x^2)   (gaussian)     or   f(x) = 1 - x   (linear)
"""
import torch

__all__ = ["mask_iou_matrix", "matrix_nms", "mask_nms"]


def _check_inputs(masks, labels, scores, fn):
    if masks.dim() != 3:
        raise ValueError(f"{fn}: masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n = masks.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"{fn}: scores must be (N,) = ({n},), got {tuple(scores.shape)}")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{fn}: labels must be (N,) = ({n},), got {tuple(labels.shape)}")


def mask_iou_matrix(masks, areas=None, labels=None):
    """Pairwise IoU of binary masks.

    Args:
        masks (Tensor): (N, H, W) bool or {0,1} masks.
        areas (Tensor or None): (N,) pixel count of each mask; computed when None.
        labels (Tensor or None): (N,) classes; when given, only pairs of the same class are
            computed (one product per class) and the others are 0. The intersections are
            sums of 0/1 products, exact in float32 in any order (below 2^24 pixels), so the
            computed entries equal those of the full matrix.
    Returns:
        Tensor: (N, N) float IoU; 0 where both masks are empty.
    """
    n = masks.shape[0]
    flat = masks.flatten(1)
    if areas is None:
        areas = flat.sum(dim=1).float()
    if labels is None:
        f = flat.float()
        inter = f @ f.t()
    else:
        sorted_labels, order = torch.sort(labels, stable=True)
        counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1]
        inter = None
        for idx in torch.split(order, counts.tolist()):
            f = flat[idx].float()
            block = f @ f.t()  # (under autocast in its dtype, as the full product would be)
            if inter is None:
                inter = block.new_zeros((n, n))
            inter[idx[:, None], idx[None, :]] = block
        if inter is None:  # no masks
            inter = flat.new_zeros((n, n), dtype=torch.float32)
    union = areas[:, None] + areas[None, :] - inter
    return inter / union.clamp(min=1e-6)


def matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0, areas=None):
    """Matrix NMS: decays the score of every mask by its overlap with better ones.

    Args:
        masks (Tensor): (N, H, W) binary masks (bool or {0,1}).
        labels (Tensor or None): (N,) class of each mask; only masks of the same class
            suppress each other. None: class-agnostic.
        scores (Tensor): (N,) scores.
        kernel (str): "gaussian" or "linear" (the decay function f above).
        sigma (float): gaussian kernel's sigma.
        areas (Tensor or None): (N,) mask areas, if the caller has them.
    Returns:
        Tensor: (N,) decayed scores, in the input order. The best-scored mask of each
        class keeps its score; callers then drop masks under a threshold
        (SOLOv2's UPDATE_THR).
    """
    _check_inputs(masks, labels, scores, "matrix_nms")
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"matrix_nms: kernel must be 'gaussian' or 'linear', got {kernel!r}")
    n = masks.shape[0]
    if n == 0:
        return scores.clone()
    order = torch.argsort(scores, descending=True, stable=True)
    m = masks[order]
    # only same-class masks suppress each other: their IoU alone is computed, the rest is 0
    iou = mask_iou_matrix(m, None if areas is None else areas[order],
                          None if labels is None else labels[order])
    # Row i, column j: overlap of j with the better-scored i (i < j after sorting).
    iou = iou.triu(diagonal=1)
    # For every i: how much i itself is overlapped by better-scored masks.
    compensate = iou.max(dim=0).values  # (N,)
    if kernel == "gaussian":
        decay = torch.exp(-sigma * iou**2) / torch.exp(-sigma * compensate**2)[:, None]
    else:
        decay = (1.0 - iou) / (1.0 - compensate).clamp(min=1e-6)[:, None]
    # Entries with i >= j are (1 / f(comp_i)) >= 1 and row 0 is f(IoU_0j) <= 1, so the
    # column minimum is exactly min(1, min over better-scored i).
    decay = decay.min(dim=0).values
    out = torch.empty_like(scores)
    out[order] = scores[order] * decay
    return out


def mask_nms(masks, labels, scores, iou_threshold=0.5, areas=None):
    """Hard NMS on masks (SOLO): keep the best mask, drop same-class masks whose IoU with a
    kept one exceeds ``iou_threshold``, repeat.

    Args:
        masks (Tensor): (N, H, W) binary masks.
        labels (Tensor or None): (N,) classes (None: class-agnostic).
        scores (Tensor): (N,) scores.
        iou_threshold (float): IoU above which a worse mask is removed.
        areas (Tensor or None): (N,) mask areas, if known.
    Returns:
        Tensor: (K,) long indices (into the input) of the kept masks, best first.
    """
    _check_inputs(masks, labels, scores, "mask_nms")
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = mask_iou_matrix(masks[order], None if areas is None else areas[order],
                          None if labels is None else labels[order])
    over = (iou > iou_threshold).cpu()
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=scores.device)]
