"""SparseInst's losses (paper Sec. 3.5, Eq. 3-4): focal classification, dice + pixel BCE
masks, BCE objectness against the predicted-vs-ground-truth mask IoU.

Shapes: B batch, N predictions per image, C classes, M matched pairs in the batch,
P pixels of the mask output (Hm * Wm), K_b ground truths of image b.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from detectron2.utils import comm

from .matcher import SparseInstMatcher


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Summed sigmoid focal loss (Lin et al.): -a_t (1 - p_t)^gamma log(p_t) per element.

    logits, targets: same shape, targets in {0, 1}. Returns a scalar (sum).
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def dice_loss(pred_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Summed dice loss 1 - 2 sum(m t) / (sum(m^2) + sum(t^2)) over matched pairs.

    pred_logits: (M, P) mask logits; targets: (M, P) in [0, 1]. Returns a scalar (sum over M).
    """
    m = pred_logits.sigmoid()
    numerator = 2.0 * (m * targets).sum(-1)
    denominator = (m * m).sum(-1) + (targets * targets).sum(-1)
    return (1.0 - numerator / (denominator + eps)).sum()


@torch.no_grad()
def mask_iou(pred_logits: torch.Tensor, targets: torch.Tensor, pred_threshold: float = 0.4,
             target_threshold: float = 0.5) -> torch.Tensor:
    """IoU of binarised masks, the objectness target. (M, P), (M, P) -> (M,).

    A prediction pixel counts when sigmoid >= ``pred_threshold`` (reference: 0.4); a
    target pixel when > ``target_threshold``.
    """
    pred = (pred_logits.sigmoid() >= pred_threshold).float()
    tgt = (targets > target_threshold).float()
    inter = (pred * tgt).sum(-1)
    union = pred.sum(-1) + tgt.sum(-1) - inter
    return inter / (union + 1e-6)


class SparseInstCriterion:
    """Matches predictions to ground truths per image and returns the weighted losses.

    L = lambda_c L_cls + lambda_dice L_dice + lambda_pix L_pix + lambda_s L_s with
    L_cls the focal loss summed over all B*N*C logits and L_dice the dice loss summed over
    matched pairs, both divided by the number of ground truths (averaged over workers,
    at least 1); L_pix the pixel BCE averaged over matched pixels; L_s the BCE of the
    objectness logit against the (detached) mask IoU, averaged over matched pairs.
    """

    def __init__(self, num_classes, matcher=None, class_weight=2.0, dice_weight=2.0, pixel_weight=2.0,
                 objectness_weight=1.0, focal_alpha=0.25, focal_gamma=2.0):
        self.num_classes = num_classes
        self.matcher = matcher or SparseInstMatcher()
        self.weights = {"loss_cls": class_weight, "loss_dice": dice_weight, "loss_mask": pixel_weight,
                        "loss_objectness": objectness_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg):
        si = cfg.MODEL.SPARSE_INST
        return cls(si.DECODER.NUM_CLASSES, SparseInstMatcher(si.MATCHER.ALPHA, si.MATCHER.BETA, si.MATCHER.LOCATION_SIGMA),
                   si.LOSS.CLASS_WEIGHT, si.LOSS.MASK_DICE_WEIGHT, si.LOSS.MASK_PIXEL_WEIGHT,
                   si.LOSS.OBJECTNESS_WEIGHT, si.LOSS.FOCAL_ALPHA, si.LOSS.FOCAL_GAMMA)

    def __call__(self, outputs: Dict[str, torch.Tensor], gt_classes: List[torch.Tensor],
                 gt_masks: List[torch.Tensor],
                 image_extents: Optional[List[Tuple[float, float]]] = None) -> Dict[str, torch.Tensor]:
        """outputs: the decoder's dict (``pred_logits`` (B, N, C), ``pred_masks`` (B, N, Hm, Wm),
        ``pred_scores`` (B, N, 1)); gt_classes[b]: (K_b,) int64 in [0, C); gt_masks[b]:
        (K_b, Hm, Wm) targets in [0, 1] at the mask output's resolution; image_extents[b]: the
        (height, width) fractions of the padded maps image b covers (``matcher.image_extents``;
        None: every image fills them), for the matcher's location term.
        """
        logits, masks, scores = outputs["pred_logits"], outputs["pred_masks"], outputs["pred_scores"]
        b, n, c = logits.shape
        if c != self.num_classes:
            raise ValueError(f"decoder predicts {c} classes but MODEL.SPARSE_INST.DECODER.NUM_CLASSES="
                             f"{self.num_classes}")
        flat_masks = masks.flatten(2)  # (B, N, P)

        batch_idx, pred_idx, matched_targets, matched_classes = [], [], [], []
        for i in range(b):
            cls_i = gt_classes[i].to(logits.device)
            if cls_i.numel() and (int(cls_i.min()) < 0 or int(cls_i.max()) >= c):
                raise ValueError(f"gt_classes of image {i} lie outside [0, {c}); check NUM_CLASSES")
            tgt_i = gt_masks[i].to(flat_masks).flatten(1)
            if tgt_i.shape[0] != cls_i.shape[0]:
                raise ValueError(f"image {i}: {tgt_i.shape[0]} masks but {cls_i.shape[0]} classes")
            if tgt_i.shape[0] and tgt_i.shape[1] != flat_masks.shape[-1]:
                raise ValueError(f"image {i}: target masks have {tgt_i.shape[1]} pixels, predictions "
                                 f"{flat_masks.shape[-1]}; resize targets to the mask output size")
            extent = (1.0, 1.0) if image_extents is None else image_extents[i]
            rows, cols = self.matcher(logits[i], flat_masks[i], cls_i, tgt_i, mask_hw=masks.shape[-2:], extent=extent)
            rows, cols = rows.to(logits.device), cols.to(logits.device)
            batch_idx.append(torch.full_like(rows, i))
            pred_idx.append(rows)
            matched_targets.append(tgt_i[cols])
            matched_classes.append(cls_i[cols])
        batch_idx = torch.cat(batch_idx)
        pred_idx = torch.cat(pred_idx)
        matched_targets = torch.cat(matched_targets) if matched_targets else flat_masks.new_zeros(0, flat_masks.shape[-1])
        matched_classes = torch.cat(matched_classes)

        num_gt = torch.as_tensor([float(sum(len(x) for x in gt_classes))], device=logits.device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_gt)
        num_gt = max(num_gt.item() / comm.get_world_size(), 1.0)

        cls_targets = torch.zeros_like(logits)
        cls_targets[batch_idx, pred_idx, matched_classes] = 1.0
        loss_cls = sigmoid_focal_loss(logits, cls_targets, self.focal_alpha, self.focal_gamma) / num_gt

        if pred_idx.numel() == 0:
            zero = masks.sum() * 0.0 + scores.sum() * 0.0
            losses = {"loss_cls": loss_cls, "loss_dice": zero, "loss_mask": zero.clone(),
                      "loss_objectness": zero.clone()}
        else:
            src = flat_masks[batch_idx, pred_idx]  # (M, P)
            tgt = matched_targets
            obj = scores[batch_idx, pred_idx, 0]  # (M,)
            losses = {
                "loss_cls": loss_cls,
                "loss_dice": dice_loss(src, tgt) / num_gt,
                "loss_mask": F.binary_cross_entropy_with_logits(src, tgt, reduction="mean"),
                "loss_objectness": F.binary_cross_entropy_with_logits(obj, mask_iou(src, tgt), reduction="mean"),
            }
        return {k: v * self.weights[k] for k, v in losses.items()}
