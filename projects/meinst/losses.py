"""MEInst's mask losses on positive locations (paper Eq. 3, Tables 3 and 4).

Shape shorthand: P positive locations, N code length, D = m * m mask pixels.

Each positive is weighted by its centerness target and the sum is divided by the sum of
the weights (times N or D for element-wise losses), as AdelaiDet's MEInst does; with no
positives the loss is an exact 0 that still has a graph.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MASK_LOSS_TYPES", "code_loss", "mask_bce_loss"]

MASK_LOSS_TYPES = ("mse", "l1", "smooth_l1", "cosine")


def code_loss(pred: Tensor, target: Tensor, weights: Tensor, loss_type: str = "mse") -> Tensor:
    """Loss between predicted and encoded target codes.

    Args:
        pred, target: (P, N).
        weights: (P,) non-negative (centerness targets).
        loss_type: one of MASK_LOSS_TYPES ("mse" is the paper's L2).
    Returns:
        scalar.
    """
    if pred.shape != target.shape or pred.dim() != 2 or weights.shape != pred.shape[:1]:
        raise ValueError(f"code_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                         f"weights {tuple(weights.shape)} do not fit (P, N), (P, N), (P,).")
    n = pred.shape[1]
    if loss_type == "cosine":
        per_pos = 1.0 - F.cosine_similarity(pred, target, dim=1, eps=1e-6)
        return (per_pos * weights).sum() / weights.sum().clamp(min=1e-6)
    if loss_type == "mse":
        elem = (pred - target) ** 2
    elif loss_type == "l1":
        elem = (pred - target).abs()
    elif loss_type == "smooth_l1":
        elem = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    else:
        raise ValueError(f"MODEL.MEINST.MASK_LOSS_TYPE must be one of {MASK_LOSS_TYPES}, got {loss_type!r}.")
    return (elem.sum(1) * weights).sum() / (weights.sum() * n).clamp(min=1.0)


def mask_bce_loss(pred_logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Implicit encoding: per-pixel BCE of decoded mask logits against the binary masks.

    Args:
        pred_logits: (P, D) decoded logits W v + mean.
        target: (P, D) in {0, 1}.
        weights: (P,).
    """
    d = pred_logits.shape[1]
    elem = F.binary_cross_entropy_with_logits(pred_logits, target, reduction="none")
    return (elem.sum(1) * weights).sum() / (weights.sum() * d).clamp(min=1.0)
