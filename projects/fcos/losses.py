"""FCOS losses: sigmoid focal loss (classification), IoU/GIoU loss weighted by the
centerness targets (box), binary cross-entropy (centerness).

Shape shorthand in this module:
    N: images, M: locations per image, K: foreground classes, P: positive locations

Normalisation (improved FCOS): classification and centerness by the number of positives,
box loss by the sum of the centerness targets; both averaged over workers.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from detectron2.utils import comm

from .targets import ctrness_targets

__all__ = ["iou_loss_ltrb", "reduce_mean", "FCOSLoss"]


def reduce_mean(value: Tensor) -> float:
    """Mean of a scalar tensor over all workers (itself on a single worker)."""
    world = comm.get_world_size()
    if world > 1:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        value = value / world
    return float(value.item())


def iou_loss_ltrb(pred: Tensor, target: Tensor, loss_type: str = "giou", eps: float = 1e-7,
                  smooth: float = 0.0) -> Tensor:
    """IoU-based loss between boxes given as distances from a common location.

    Both boxes contain the location (distances >= 0), so their intersection is
    (min(l)+min(r)) x (min(t)+min(b)) and their enclosing box (max(l)+max(r)) x (...).

    Args:
        pred, target: (P, 4) (l, t, r, b), >= 0, in the same units.
        loss_type: "giou" (1 - GIoU) or "iou" (-log IoU).
        smooth: IoU = (inter + smooth) / (union + smooth) (``MODEL.FCOS.LOC_LOSS_IOU_SMOOTH``;
            AdelaiDet uses 1); the GIoU penalty term is unchanged.
    Returns:
        (P,) loss per pair.
    """
    pl, pt, pr, pb = pred.unbind(dim=1)
    tl, tt, tr, tb = target.unbind(dim=1)
    area_p = (pl + pr) * (pt + pb)
    area_t = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (
        torch.minimum(pt, tt) + torch.minimum(pb, tb)
    )
    union = area_p + area_t - inter
    if smooth:
        iou = (inter + smooth) / (union + smooth).clamp(min=eps)
    else:
        iou = inter / union.clamp(min=eps)
    if loss_type == "iou":
        return -torch.log(iou.clamp(min=eps))
    if loss_type == "giou":
        enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (
            torch.maximum(pt, tt) + torch.maximum(pb, tb)
        )
        giou = iou - (enclose - union) / enclose.clamp(min=eps)
        return 1.0 - giou
    raise ValueError(f"MODEL.FCOS.LOC_LOSS_TYPE must be 'giou' or 'iou', got {loss_type!r}.")


class FCOSLoss(nn.Module):
    """The three FCOS losses from flattened predictions and assigned targets."""

    def __init__(self, num_classes: int, focal_alpha=0.25, focal_gamma=2.0, loc_loss_type="giou",
                 iou_smooth: float = 0.0):
        super().__init__()
        if loc_loss_type not in ("giou", "iou"):
            raise ValueError(
                f"MODEL.FCOS.LOC_LOSS_TYPE must be 'giou' or 'iou', got {loc_loss_type!r}."
            )
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loc_loss_type = loc_loss_type
        self.iou_smooth = float(iou_smooth)

    def forward(
        self,
        logits: Tensor,
        reg_pred: Tensor,
        ctrness_pred: Tensor,
        labels: Tensor,
        reg_targets: Tensor,
    ) -> Dict[str, Tensor]:
        """
        Args:
            logits: (N, M, K) classification logits.
            reg_pred: (N, M, 4) predicted (l, t, r, b), in the same units as reg_targets
                (FCOS uses distances divided by the level's stride).
            ctrness_pred: (N, M) centerness logits.
            labels: (N, M) long in [0, K], K = background.
            reg_targets: (N, M, 4) target (l, t, r, b) (background rows ignored).
        Returns:
            {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}: scalars.
        """
        K = self.num_classes
        if logits.shape[-1] != K:
            raise ValueError(f"logits have {logits.shape[-1]} classes, MODEL.FCOS.NUM_CLASSES={K}.")
        pos = labels < K  # (N, M)
        num_pos = reduce_mean(pos.sum().to(torch.float32))
        num_pos = max(num_pos, 1.0)

        cls_target = torch.zeros_like(logits)
        pos_idx = pos.nonzero(as_tuple=True)
        cls_target[pos_idx + (labels[pos_idx],)] = 1.0
        loss_cls = sigmoid_focal_loss(
            logits, cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        ) / num_pos

        reg_pred_pos = reg_pred[pos_idx]  # (P, 4)
        reg_targets_pos = reg_targets[pos_idx]
        ctr_pred_pos = ctrness_pred[pos_idx]
        ctr_t = ctrness_targets(reg_targets_pos)
        # Every worker joins this reduction, with or without positives.
        ctr_norm = max(reduce_mean(ctr_t.sum()), 1e-6)
        if reg_pred_pos.shape[0] == 0:
            # No positive in this batch: zero losses that still touch the outputs (DDP).
            zero = reg_pred.sum() * 0.0 + ctrness_pred.sum() * 0.0
            return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": zero, "loss_fcos_ctr": zero}

        loss_loc = (iou_loss_ltrb(reg_pred_pos, reg_targets_pos, self.loc_loss_type,
                                  smooth=self.iou_smooth) * ctr_t).sum()
        loss_loc = loss_loc / ctr_norm
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_pred_pos, ctr_t, reduction="sum") / num_pos
        return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
