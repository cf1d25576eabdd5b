"""FCOS target assignment: which ground-truth box (if any) each feature location regresses.

Shape shorthand in this module:
    N: images in the batch
    L: FPN levels (P3-P7 by default)
    Hl, Wl: height and width of level l;  M = sum_l Hl * Wl locations per image
    G: ground-truth instances in one image
    K: foreground classes (label K means background)

Locations are ordered level by level, and inside a level row by row (y outer, x inner),
which is the order of ``tensor.permute(0, 2, 3, 1).reshape(N, Hl * Wl, C)``.

Rules (FCOS paper and its improved version):
  * a location is a candidate of a box if it lies inside the box and, with central
    sampling, inside the square of half-side ``radius * stride`` around the box centre
    (the square is clipped to the box);
  * a candidate is kept only if ``max(l, t, r, b)`` falls in the size range of the level
    the location belongs to;
  * a location that is still a candidate of several boxes goes to the box of smallest area.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.structures import Instances

INF = 1e8

__all__ = [
    "compute_locations",
    "size_ranges_from_sizes_of_interest",
    "FCOSTargets",
    "assign_targets_single_image",
    "assign_targets",
    "ctrness_targets",
]


def compute_locations(height: int, width: int, stride: int, device=None) -> Tensor:
    """Image coordinates of the locations of one feature map.

    Location (i, j) of a map of stride s sits at (j * s + s // 2, i * s + s // 2).

    Returns:
        Tensor (height * width, 2): (x, y) per location, row-major.
    """
    shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
    shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    return torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)), dim=1) + stride // 2


def size_ranges_from_sizes_of_interest(sizes_of_interest: Sequence[float], num_levels: int):
    """[[lo, hi] per level] from the L-1 upper bounds of ``MODEL.FCOS.SIZES_OF_INTEREST``.

    The first level starts at -1 (so 0 is inside) and the last is open (INF).
    """
    sizes = list(sizes_of_interest)
    if len(sizes) != num_levels - 1:
        raise ValueError(
            f"MODEL.FCOS.SIZES_OF_INTEREST has {len(sizes)} values but there are "
            f"{num_levels} levels in MODEL.FCOS.IN_FEATURES; it needs {num_levels - 1}."
        )
    if any(b <= a for a, b in zip(sizes[:-1], sizes[1:])):
        raise ValueError(f"MODEL.FCOS.SIZES_OF_INTEREST must increase, got {sizes}.")
    bounds = [-1.0] + [float(s) for s in sizes] + [INF]
    return [[bounds[i], bounds[i + 1]] for i in range(num_levels)]


@dataclass
class FCOSTargets:
    """Training targets of a batch, per location (locations ordered as in the module doc).

    Attributes:
        labels: (N, M) long, class in [0, K) for positives, K for background.
        gt_inds: (N, M) long, index of the matched instance within its image's
            ``gt_instances``; -1 for background.
        reg_targets: (N, M, 4) float, (l, t, r, b) distances in input-image pixels from the
            location to the sides of its matched box (meaningless for background).
        fpn_levels: (M,) long, level index of each location.
        locations: (M, 2) float, (x, y) of each location in input-image pixels.
        strides: (M,) float, stride of the level of each location.
    """

    labels: Tensor
    gt_inds: Tensor
    reg_targets: Tensor
    fpn_levels: Tensor
    locations: Tensor
    strides: Tensor


def assign_targets_single_image(
    locations: Tensor,
    loc_strides: Tensor,
    loc_size_ranges: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    num_classes: int,
    center_sampling_radius: float = 1.5,
    gt_centers: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Assign every location of one image to at most one ground-truth box.

    Args:
        locations: (M, 2) (x, y) of the locations.
        loc_strides: (M,) stride of each location's level.
        loc_size_ranges: (M, 2) [lo, hi] allowed for max(l, t, r, b) at each location.
        gt_boxes: (G, 4) XYXY boxes in input-image pixels.
        gt_classes: (G,) long classes in [0, K).
        num_classes: K; the background label.
        center_sampling_radius: radius in strides of the central region; <= 0 disables
            central sampling (every location inside the box is a candidate).
        gt_centers: optional (G, 2) centres for central sampling (e.g. mask centres of
            mass, as CondInst uses); box centres when None.

    Returns:
        labels (M,) long, gt_inds (M,) long (-1 for background), reg_targets (M, 4).
    """
    M = locations.shape[0]
    G = gt_boxes.shape[0]
    if G == 0:
        return (
            torch.full((M,), num_classes, dtype=torch.long, device=locations.device),
            torch.full((M,), -1, dtype=torch.long, device=locations.device),
            locations.new_zeros((M, 4)),
        )
    xs, ys = locations[:, 0:1], locations[:, 1:2]  # (M, 1)
    x0, y0, x1, y1 = gt_boxes.unbind(dim=1)  # (G,)
    # (M, G, 4): (l, t, r, b) from every location to every box.
    ltrb = torch.stack([xs - x0, ys - y0, x1 - xs, y1 - ys], dim=2)

    if center_sampling_radius > 0:
        if gt_centers is None:
            cx, cy = (x0 + x1) * 0.5, (y0 + y1) * 0.5
        else:
            cx, cy = gt_centers[:, 0], gt_centers[:, 1]
        r = loc_strides[:, None] * center_sampling_radius  # (M, 1)
        # Central square clipped to the box.
        sx0 = torch.maximum(cx - r, x0)
        sy0 = torch.maximum(cy - r, y0)
        sx1 = torch.minimum(cx + r, x1)
        sy1 = torch.minimum(cy + r, y1)
        inside = torch.stack([xs - sx0, ys - sy0, sx1 - xs, sy1 - ys], dim=2).min(dim=2).values > 0
    else:
        inside = ltrb.min(dim=2).values > 0

    max_dist = ltrb.max(dim=2).values  # (M, G)
    in_range = (max_dist >= loc_size_ranges[:, 0:1]) & (max_dist <= loc_size_ranges[:, 1:2])

    areas = ((x1 - x0) * (y1 - y0))[None].expand(M, G)
    cost = torch.where(inside & in_range, areas, torch.full_like(areas, INF))
    min_area, gt_inds = cost.min(dim=1)  # ties: first (lowest-index) box
    is_bg = min_area >= INF

    labels = gt_classes[gt_inds].clone()
    labels[is_bg] = num_classes
    reg_targets = ltrb[torch.arange(M, device=ltrb.device), gt_inds]
    gt_inds = gt_inds.clone()
    gt_inds[is_bg] = -1
    return labels, gt_inds, reg_targets


def assign_targets(
    locations_per_level: List[Tensor],
    strides: Sequence[int],
    size_ranges: Sequence[Sequence[float]],
    gt_instances: List[Instances],
    num_classes: int,
    center_sampling_radius: float = 1.5,
) -> FCOSTargets:
    """Assign targets for a batch.

    Args:
        locations_per_level: L tensors (Hl * Wl, 2) from :func:`compute_locations`.
        strides: L strides.
        size_ranges: L pairs [lo, hi] (see :func:`size_ranges_from_sizes_of_interest`).
        gt_instances: N Instances with ``gt_boxes`` and ``gt_classes``; an optional
            ``gt_centers`` (G, 2) field replaces box centres in central sampling.
        num_classes: K.
        center_sampling_radius: see :func:`assign_targets_single_image`.
    """
    if not (len(locations_per_level) == len(strides) == len(size_ranges)):
        raise ValueError(
            f"{len(locations_per_level)} feature levels but {len(strides)} strides "
            f"(MODEL.FCOS.FPN_STRIDES) and {len(size_ranges)} size ranges."
        )
    device = locations_per_level[0].device
    locations = torch.cat(locations_per_level, dim=0)
    counts = [len(loc) for loc in locations_per_level]
    fpn_levels = torch.cat(
        [torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)]
    )
    loc_strides = torch.tensor(strides, dtype=torch.float32, device=device)[fpn_levels]
    loc_size_ranges = torch.tensor(size_ranges, dtype=torch.float32, device=device)[fpn_levels]

    labels, gt_inds, reg_targets = [], [], []
    for inst in gt_instances:
        if not inst.has("gt_boxes") or not inst.has("gt_classes"):
            raise ValueError("FCOS training needs gt_boxes and gt_classes in every 'instances'.")
        centers = inst.gt_centers if inst.has("gt_centers") else None
        lab, ind, reg = assign_targets_single_image(
            locations,
            loc_strides,
            loc_size_ranges,
            inst.gt_boxes.tensor.to(device=device, dtype=torch.float32),
            inst.gt_classes.to(device),
            num_classes,
            center_sampling_radius,
            gt_centers=centers,
        )
        labels.append(lab)
        gt_inds.append(ind)
        reg_targets.append(reg)
    return FCOSTargets(
        labels=torch.stack(labels),
        gt_inds=torch.stack(gt_inds),
        reg_targets=torch.stack(reg_targets),
        fpn_levels=fpn_levels,
        locations=locations,
        strides=loc_strides,
    )


def ctrness_targets(reg_targets: Tensor) -> Tensor:
    """Centerness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)).

    Args:
        reg_targets: (P, 4) positive (l, t, r, b) distances.
    Returns:
        (P,) values in [0, 1].
    """
    if reg_targets.numel() == 0:
        return reg_targets.new_zeros(reg_targets.shape[0])
    lr = reg_targets[:, [0, 2]]
    tb = reg_targets[:, [1, 3]]
    ctr = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-6)) * (
        tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-6)
    )
    return torch.sqrt(ctr.clamp(min=0))
