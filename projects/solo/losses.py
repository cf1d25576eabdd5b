"""SOLO's losses: Dice loss on masks and sigmoid focal loss on grid categories.

Shape shorthand:
    P: positive cells (predicted masks with a target)
    h, w: mask resolution
    M: category predictions (cells x images), C: classes
"""
from fvcore.nn import sigmoid_focal_loss

__all__ = ["dice_loss", "category_focal_loss"]


def dice_loss(probs, targets, eps=1e-3):
    """Dice loss of SOLO (the V-Net form with squared terms), one value per mask:

        L = 1 - 2 * sum(p * q) / (sum(p^2) + sum(q^2))

    Args:
        probs (Tensor): (P, h, w) predicted mask probabilities in [0, 1].
        targets (Tensor): (P, h, w) targets in [0, 1].
        eps (float): added to each squared sum, so two empty masks give a loss near 0
            rather than 0/0.
    Returns:
        Tensor: (P,) losses.
    """
    if probs.shape != targets.shape:
        raise ValueError(f"dice_loss: probs {tuple(probs.shape)} and targets "
                         f"{tuple(targets.shape)} differ")
    p = probs.flatten(1)
    q = targets.flatten(1).to(p.dtype)
    inter = (p * q).sum(dim=1)
    denom = (p * p).sum(dim=1) + eps + (q * q).sum(dim=1) + eps
    return 1.0 - 2.0 * inter / denom


def category_focal_loss(logits, labels, num_classes, alpha, gamma, num_pos):
    """Sigmoid focal loss over all grid cells, normalised by (num_pos + 1) as in SOLO.

    Args:
        logits (Tensor): (M, C) category logits.
        labels (Tensor): (M,) long in [0, C]; C is background.
        num_classes (int): C.
        alpha, gamma (float): focal loss parameters.
        num_pos (int): number of positive cells.
    Returns:
        Tensor: scalar loss.
    """
    onehot = logits.new_zeros(logits.shape)
    pos = labels < num_classes
    onehot[pos, labels[pos]] = 1.0
    loss = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / (num_pos + 1.0)
