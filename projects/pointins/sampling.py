"""Positive point sampling of PointINS in training (paper Section 3.3, Tables 7-9).

Shape shorthand in this module:
    P: candidate points (a point with one of its anchors that passes the anchor condition:
       IoU(anchor, GT) > threshold for RetinaNet, FCOS's own positives for FCOS),
    T = 3 target box types (anchor, GT, regressed box), S: sampled positives

Each candidate can be paired with each of the T target boxes; a pair (p, t) is positive if
IoU(target box t, GT) > ``box_iou_thresh``. At most ``num_samples`` pairs are drawn per
batch: type t gets a quota ``ratios[t] * num_samples`` (largest-remainder rounding), drawn
uniformly from its positive pairs; quota a type cannot fill (too few positive pairs, e.g.
regressed boxes early in training) goes to the remaining positive pairs of the types whose
ratio is non-zero. Types with ratio 0 are never drawn. The same point may be drawn several
times, with different anchors or target boxes, as in the paper.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["type_quotas", "sample_positive_pairs", "check_sample_ratios"]


def check_sample_ratios(ratios: Sequence[float]) -> Tuple[float, ...]:
    """Validate MODEL.POINTINS.SAMPLE_RATIOS (3 non-negative shares, not all 0)."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(
            "MODEL.POINTINS.SAMPLE_RATIOS must be 3 non-negative shares (anchor, GT, "
            f"regressed box), not all 0; got {list(ratios)}."
        )
    return ratios


def type_quotas(ratios: Sequence[float], num_samples: int) -> list:
    """Integer quotas per type summing to ``num_samples`` (largest-remainder rounding of
    ``ratios / sum(ratios) * num_samples``; ties go to the earlier type)."""
    ratios = check_sample_ratios(ratios)
    total = sum(ratios)
    exact = [r / total * num_samples for r in ratios]
    quotas = [int(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda t: (-(exact[t] - quotas[t]), t))
    for t in order[: num_samples - sum(quotas)]:
        quotas[t] += 1
    return quotas


def sample_positive_pairs(
    box_ious: Tensor,
    box_iou_thresh: float,
    ratios: Sequence[float],
    num_samples: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Draw the positive (candidate, target box type) pairs of a batch.

    Args:
        box_ious: (P, T) IoU of each candidate's target box of each type with its GT
            (use a negative value where a type has no box, e.g. FCOS's anchor).
        box_iou_thresh: a pair is positive if its IoU is strictly above this.
        ratios: T shares of the types (anchor, GT, regressed box).
        num_samples: at most this many pairs; <= 0 draws every positive pair.
        generator: optional torch.Generator for reproducible draws.
    Returns:
        cand_inds (S,) long index into the P candidates and types (S,) long in [0, T),
        ordered by type.
    """
    ratios = check_sample_ratios(ratios)
    if box_ious.dim() != 2 or box_ious.shape[1] != len(ratios):
        raise ValueError(f"box_ious must be (P, {len(ratios)}), got {tuple(box_ious.shape)}.")
    device = box_ious.device
    allowed = torch.tensor([r > 0 for r in ratios], device=device)
    positive = (box_ious > box_iou_thresh) & allowed[None, :]  # (P, T)
    cand, types = positive.nonzero(as_tuple=True)  # ordered by candidate, then type
    if num_samples <= 0 or cand.numel() <= num_samples:
        order = torch.argsort(types * max(len(cand), 1) + torch.arange(len(cand), device=device))
        return cand[order], types[order]

    def perm(n):
        return torch.randperm(n, generator=generator).to(device)

    chosen, leftovers = [], []
    for t, quota in enumerate(type_quotas(ratios, num_samples)):
        idx = (types == t).nonzero(as_tuple=True)[0]
        idx = idx[perm(len(idx))]
        chosen.append(idx[:quota])
        leftovers.append(idx[quota:])
    taken = torch.cat(chosen)
    short = num_samples - len(taken)
    if short > 0:
        rest = torch.cat(leftovers)
        taken = torch.cat([taken, rest[perm(len(rest))[:short]]])
    taken = taken[torch.argsort(types[taken] * len(cand) + taken)]
    return cand[taken], types[taken]
