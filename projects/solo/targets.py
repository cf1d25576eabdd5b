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

AdelaiDet's SOLOv2 code differs in three conventions, each selectable (docs/solo.md,
"Parity with the reference"): ``center="adelaidet"`` (center of mass with pixel i at i
instead of i + 0.5, cells by float32 floor division), ``conflict="later"`` (the later
instance takes a shared cell's category and every claimant keeps its mask target) and
``downsample="bilinear"`` in :func:`mask_targets_at` (OpenCV bilinear resize of the
unpadded mask, rounded to {0, 1}, instead of area averaging of the padded mask).
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

__all__ = ["LevelTargets", "assign_grid_targets", "center_of_mass", "mask_targets_at",
           "CENTER_CONVENTIONS", "CELL_CONFLICTS", "TARGET_DOWNSAMPLES"]

CENTER_CONVENTIONS = ("pixel_centers", "adelaidet")
CELL_CONFLICTS = ("smaller", "later")
TARGET_DOWNSAMPLES = ("area", "bilinear")


@dataclass
class LevelTargets:
    """Targets of one level for the batch.

    cate_labels: (N, S, S) long, the class of the owning instance, ``num_classes`` where
        no instance owns the cell (background).
    pos_img: (P,) long, the image of each positive cell.
    pos_cell: (P,) long, the cell index ``row * S + col``.
    pos_gt: (P,) long, the owning instance's index in its image's ``Instances``.

    With ``conflict="later"`` a cell claimed by several instances appears once per claimant
    in pos_* (AdelaiDet's duplicate mask targets); the positive cells are those of
    ``cate_labels`` below ``num_classes``.
    """

    cate_labels: torch.Tensor
    pos_img: torch.Tensor
    pos_cell: torch.Tensor
    pos_gt: torch.Tensor


def center_of_mass(masks, pixel_offset: float = 0.5):
    """Centers of mass of binary masks, in pixel coordinates (pixel i spans [i, i+1)).

    Args:
        masks (Tensor): (G, H, W) masks.
        pixel_offset (float): position of pixel i is i + pixel_offset; 0 is AdelaiDet's
            (its centers are half a pixel up and left, computed as it does).
    Returns:
        (Tensor, Tensor): (G,) x and (G,) y of the centers; nan for empty masks
        (0 with ``pixel_offset=0``, as AdelaiDet; such instances are skipped anyway).
    """
    if pixel_offset == 0:
        h, w = masks.shape[-2:]
        m = masks.float()
        ys = torch.arange(0, h, dtype=torch.float32, device=m.device)
        xs = torch.arange(0, w, dtype=torch.float32, device=m.device)
        m00 = m.sum(dim=-1).sum(dim=-1).clamp(min=1e-6)
        return (m * xs).sum(dim=-1).sum(dim=-1) / m00, (m * ys[:, None]).sum(dim=-1).sum(dim=-1) / m00
    m = masks.float()
    h, w = m.shape[-2:]
    total = m.sum(dim=(1, 2))
    ys = torch.arange(h, dtype=torch.float32, device=m.device) + pixel_offset
    xs = torch.arange(w, dtype=torch.float32, device=m.device) + pixel_offset
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


def _center_region_adelaidet(cx, cy, half_w, half_h, S, Hp, Wp):
    """As :func:`_center_region`, computed as AdelaiDet's SOLOv2 does: float32 0-dim tensors,
    cell = floor((v / size) // (1 / S)) (a center exactly on a boundary can fall in the
    lower cell), the center cell not clamped."""
    def cell(v, size):
        return int((v / size) // (1.0 / S))

    ci, cj = cell(cy, Hp), cell(cx, Wp)
    top = max(max(0, cell(cy - half_h, Hp)), ci - 1)
    bottom = min(min(S - 1, cell(cy + half_h, Hp)), ci + 1)
    left = max(max(0, cell(cx - half_w, Wp)), cj - 1)
    right = min(min(S - 1, cell(cx + half_w, Wp)), cj + 1)
    return top, bottom, left, right


@torch.no_grad()
def assign_grid_targets(gt_instances, padded_size, num_grids, scale_ranges, sigma, num_classes,
                        center="pixel_centers", conflict="smaller"):
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
        center (str): "pixel_centers" (pixel i at i + 0.5) or "adelaidet" (AdelaiDet's
            centers and cell arithmetic), see the module docstring.
        conflict (str): "smaller" (a shared cell goes to the smaller instance) or "later"
            (to the later instance; every claimant keeps its mask target).
    Returns:
        list[LevelTargets]: one per level.
    """
    if len(num_grids) != len(scale_ranges):
        raise ValueError(
            f"MODEL.SOLO.NUM_GRIDS has {len(num_grids)} levels but FPN_SCALE_RANGES has "
            f"{len(scale_ranges)}"
        )
    if center not in CENTER_CONVENTIONS:
        raise ValueError(f"MODEL.SOLO.CENTER_CONVENTION must be one of {CENTER_CONVENTIONS}, got {center!r}")
    if conflict not in CELL_CONFLICTS:
        raise ValueError(f"MODEL.SOLO.CELL_CONFLICT must be one of {CELL_CONFLICTS}, got {conflict!r}")
    Hp, Wp = padded_size
    n_img = len(gt_instances)
    device = gt_instances[0].gt_classes.device if n_img else torch.device("cpu")
    cate = [torch.full((n_img, S, S), num_classes, dtype=torch.long) for S in num_grids]
    owner = [torch.full((n_img, S, S), -1, dtype=torch.long) for S in num_grids]
    claims = [[] for _ in num_grids]  # conflict="later": (image, cell, instance) in order
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
        cx, cy = (t.cpu() for t in center_of_mass(masks, 0.0 if center == "adelaidet" else 0.5))
        valid = masks.flatten(1).any(dim=1).cpu()
        order = range(len(inst)) if conflict == "later" else torch.argsort(scale, descending=True).tolist()
        for g in order:
            if not valid[g]:
                continue
            for lvl, (S, (lo, hi)) in enumerate(zip(num_grids, scale_ranges)):
                if not (lo <= scale[g] <= hi):
                    continue
                if center == "adelaidet":
                    t, b, l, r = _center_region_adelaidet(
                        cx[g], cy[g], 0.5 * bw[g] * sigma, 0.5 * bh[g] * sigma, S, Hp, Wp)
                else:
                    half_w, half_h = 0.5 * sigma * float(bw[g]), 0.5 * sigma * float(bh[g])
                    t, b, l, r = _center_region(float(cx[g]), float(cy[g]), half_w, half_h, S, Hp, Wp)
                if b < t or r < l:
                    continue
                cate[lvl][n, t : b + 1, l : r + 1] = int(classes[g])
                owner[lvl][n, t : b + 1, l : r + 1] = g
                if conflict == "later":
                    cells = [i * S + j for i in range(t, b + 1) for j in range(l, r + 1)]
                    claims[lvl] += [(n, c, g) for c in cells]
    out = []
    for lvl, S in enumerate(num_grids):
        if conflict == "later":
            rows = torch.tensor(claims[lvl], dtype=torch.long).reshape(-1, 3)
            out.append(LevelTargets(cate_labels=cate[lvl].to(device), pos_img=rows[:, 0].to(device),
                                    pos_cell=rows[:, 1].to(device), pos_gt=rows[:, 2].to(device)))
            continue
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


def _bilinear_targets(masks, scale, size):
    """AdelaiDet's SOLOv2 targets: (G, H, W) binary masks resized by ``scale`` with OpenCV's
    bilinear interpolation on uint8 (so {0, 1}), new size (int(W * scale + 0.5),
    int(H * scale + 0.5)), placed in the top-left corner of a zero (G, h, w) map."""
    import cv2
    import numpy as np

    g, H, W = masks.shape
    h, w = size
    out = torch.zeros((g, h, w))
    if g == 0:
        return out
    new_w, new_h = int(W * float(scale) + 0.5), int(H * float(scale) + 0.5)
    m = masks.to(torch.uint8).cpu().numpy()
    for i in range(g):
        r = cv2.resize(np.ascontiguousarray(m[i]), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        r = torch.from_numpy(r.reshape(new_h, new_w)).float()
        hh, ww = min(h, new_h), min(w, new_w)
        out[i, :hh, :ww] = r[:hh, :ww]
    return out


def mask_targets_at(gt_instances, padded_size, size, pos_img, pos_gt, downsample="area"):
    """Ground-truth masks of the positive cells at a level's mask resolution.

    ``downsample="area"``: each mask is padded to (Hp, Wp) and area-averaged down to
    ``size``; the targets are the covered fraction of each output pixel (soft, in [0, 1]),
    which the Dice loss takes as is and which keeps objects smaller than one output pixel
    visible. ``"bilinear"``: AdelaiDet's targets, the unpadded mask resized by h / Hp with
    OpenCV's bilinear interpolation on uint8 ({0, 1}: about "at least half of the 2 x 2
    pixels around the sample point") and placed top-left (:func:`_bilinear_targets`).

    Args:
        gt_instances (list[Instances]): per image, with ``gt_masks``.
        padded_size (tuple[int, int]): (Hp, Wp).
        size (tuple[int, int]): (h, w) output size.
        pos_img, pos_gt (Tensor): (P,) image and instance index of each positive.
        downsample (str): "area" or "bilinear".
    Returns:
        Tensor: (P, h, w) float targets.
    """
    if downsample not in TARGET_DOWNSAMPLES:
        raise ValueError(f"MODEL.SOLO.MASK_TARGET_DOWNSAMPLE must be one of {TARGET_DOWNSAMPLES}, "
                         f"got {downsample!r}")
    Hp, Wp = padded_size
    h, w = size
    out = torch.zeros((len(pos_img), h, w), device=pos_img.device)
    for n in pos_img.unique().tolist():
        sel = pos_img == n
        gts = pos_gt[sel]
        if downsample == "bilinear":
            per_gt = _bilinear_targets(gt_instances[n].gt_masks.tensor, h / Hp, (h, w))
            out[sel] = per_gt.to(out.device)[gts.cpu()]
            continue
        m = gt_instances[n].gt_masks.tensor[gts].float()
        m = F.pad(m, (0, Wp - m.shape[-1], 0, Hp - m.shape[-2]))
        if (Hp, Wp) != (h, w):
            m = F.adaptive_avg_pool2d(m[:, None], (h, w))[:, 0]
        out[sel] = m.to(out.device)
    return out


def flatten_cate_labels(targets: List[LevelTargets]):
    """(N * sum(S^2),) labels, level after level, each level image-major then row-major."""
    return torch.cat([t.cate_labels.flatten() for t in targets])
