"""SOLO's ground truth: which grid cells of which FPN level own which instance.

Shape shorthand:
    N: images in the batch            G: ground-truth instances of one image
    L: FPN levels                     S: grid size of a level (S x S cells)
    P: positive cells of a level (over the whole batch)
    Hp, Wp: padded batch image size   h, w: a level's mask output size

Rules (SOLO, ECCV 2020, Sec. 3): an instance goes to every level whose scale range holds
sqrt(box width * box height); on that level it owns the cells of its *center region*,
the box scaled by sigma (epsilon = 0.2) around the mask's center of mass, limited to the
3 x 3 cells around the center cell. The grid spans the padded image. Where two instances
of a level want the same cell, the smaller one wins (instances are written largest
first). Instances with an empty mask are ignored.
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

__all__ = ["LevelTargets", "assign_grid_targets", "center_of_mass", "mask_targets_at"]


@dataclass
class LevelTargets:
    """Targets of one level for the batch.

    cate_labels: (N, S, S) long, the class of the owning instance, ``num_classes`` where
        no instance owns the cell (background).
    pos_img: (P,) long, the image of each positive cell.
    pos_cell: (P,) long, the cell index ``row * S + col``.
    pos_gt: (P,) long, the owning instance's index in its image's ``Instances``.
    """

    cate_labels: torch.Tensor
    pos_img: torch.Tensor
    pos_cell: torch.Tensor
    pos_gt: torch.Tensor


def center_of_mass(masks):
    """Centers of mass of binary masks, in pixel coordinates (pixel i spans [i, i+1)).

    Args:
        masks (Tensor): (G, H, W) masks.
    Returns:
        (Tensor, Tensor): (G,) x and (G,) y of the centers; nan for empty masks.
    """
    m = masks.float()
    h, w = m.shape[-2:]
    total = m.sum(dim=(1, 2))
    ys = torch.arange(h, dtype=torch.float32, device=m.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=m.device) + 0.5
    cx = (m.sum(dim=1) * xs).sum(dim=1) / total
    cy = (m.sum(dim=2) * ys).sum(dim=1) / total
    return cx, cy


def _boxes_of(instances):
    if instances.has("gt_boxes"):
        return instances.gt_boxes.tensor
    return instances.gt_masks.get_bounding_boxes().tensor


def _center_region(cx, cy, half_w, half_h, S, Hp, Wp):
    """Cell ranges (top, bottom, left, right), inclusive, of one instance's center region."""
    def cell(v, size):
        return min(S - 1, max(0, int(v / size * S)))

    ci, cj = cell(cy, Hp), cell(cx, Wp)
    top = max(cell(cy - half_h, Hp), ci - 1)
    bottom = min(cell(cy + half_h, Hp), ci + 1)
    left = max(cell(cx - half_w, Wp), cj - 1)
    right = min(cell(cx + half_w, Wp), cj + 1)
    return top, bottom, left, right


@torch.no_grad()
def assign_grid_targets(gt_instances, padded_size, num_grids, scale_ranges, sigma, num_classes):
    """Assign ground-truth instances to grid cells of every level.

    Args:
        gt_instances (list[Instances]): per image, with ``gt_classes`` (G,), ``gt_masks``
            (BitMasks (G, H, W), H <= Hp, W <= Wp) and optionally ``gt_boxes``
            (boxes are taken from the masks when absent).
        padded_size (tuple[int, int]): (Hp, Wp), the padded batch size the grid spans.
        num_grids (list[int]): S per level.
        scale_ranges (list[(float, float)]): per level, inclusive range of sqrt(w * h).
        sigma (float): center-region scale (epsilon).
        num_classes (int): C; also the background label.
    Returns:
        list[LevelTargets]: one per level.
    """
    if len(num_grids) != len(scale_ranges):
        raise ValueError(
            f"MODEL.SOLO.NUM_GRIDS has {len(num_grids)} levels but FPN_SCALE_RANGES has "
            f"{len(scale_ranges)}"
        )
    Hp, Wp = padded_size
    n_img = len(gt_instances)
    device = gt_instances[0].gt_classes.device if n_img else torch.device("cpu")
    cate = [torch.full((n_img, S, S), num_classes, dtype=torch.long) for S in num_grids]
    owner = [torch.full((n_img, S, S), -1, dtype=torch.long) for S in num_grids]
    for n, inst in enumerate(gt_instances):
        if len(inst) == 0:
            continue
        classes = inst.gt_classes.cpu()
        if classes.min() < 0 or classes.max() >= num_classes:
            raise ValueError(
                f"gt_classes must lie in [0, MODEL.SOLO.NUM_CLASSES={num_classes}), got "
                f"{classes.tolist()}"
            )
        masks = inst.gt_masks.tensor
        boxes = _boxes_of(inst).cpu().float()
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        scale = (bw * bh).clamp(min=0).sqrt()
        cx, cy = (t.cpu() for t in center_of_mass(masks))
        valid = masks.flatten(1).any(dim=1).cpu()
        for g in torch.argsort(scale, descending=True).tolist():
            if not valid[g]:
                continue
            for lvl, (S, (lo, hi)) in enumerate(zip(num_grids, scale_ranges)):
                if not (lo <= scale[g] <= hi):
                    continue
                half_w, half_h = 0.5 * sigma * float(bw[g]), 0.5 * sigma * float(bh[g])
                t, b, l, r = _center_region(float(cx[g]), float(cy[g]), half_w, half_h, S, Hp, Wp)
                cate[lvl][n, t : b + 1, l : r + 1] = int(classes[g])
                owner[lvl][n, t : b + 1, l : r + 1] = g
    out = []
    for lvl, S in enumerate(num_grids):
        own = owner[lvl].flatten(1)  # (N, S*S)
        img, cell = torch.nonzero(own >= 0, as_tuple=True)
        out.append(
            LevelTargets(
                cate_labels=cate[lvl].to(device),
                pos_img=img.to(device),
                pos_cell=cell.to(device),
                pos_gt=own[img, cell].to(device),
            )
        )
    return out


def mask_targets_at(gt_instances, padded_size, size, pos_img, pos_gt):
    """Ground-truth masks of the positive cells at a level's mask resolution.

    Each mask is padded to (Hp, Wp) and area-averaged down to ``size``; the targets are
    the covered fraction of each output pixel (soft, in [0, 1]), which the Dice loss takes
    as is and which keeps objects smaller than one output pixel visible.

    Args:
        gt_instances (list[Instances]): per image, with ``gt_masks``.
        padded_size (tuple[int, int]): (Hp, Wp).
        size (tuple[int, int]): (h, w) output size.
        pos_img, pos_gt (Tensor): (P,) image and instance index of each positive.
    Returns:
        Tensor: (P, h, w) float targets.
    """
    Hp, Wp = padded_size
    h, w = size
    out = torch.zeros((len(pos_img), h, w), device=pos_img.device)
    for n in pos_img.unique().tolist():
        sel = pos_img == n
        gts = pos_gt[sel]
        m = gt_instances[n].gt_masks.tensor[gts].float()
        m = F.pad(m, (0, Wp - m.shape[-1], 0, Hp - m.shape[-2]))
        if (Hp, Wp) != (h, w):
            m = F.adaptive_avg_pool2d(m[:, None], (h, w))[:, 0]
        out[sel] = m.to(out.device)
    return out


def flatten_cate_labels(targets: List[LevelTargets]):
    """(N * sum(S^2),) labels, level after level, each level image-major then row-major."""
    return torch.cat([t.cate_labels.flatten() for t in targets])
