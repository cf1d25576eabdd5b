"""Where PointRend looks: regular grids, the training-time biased sampler (k, beta) and the
inference-time choice of the N most uncertain cells of a grid (paper, section 3.1).

Shape shorthand:
    R: regions (boxes) or images, C: classes (or 1), H, W: grid size
    P: points per region, N: points asked for

All point coordinates are in [0, 1] x [0, 1] (x first) relative to a region (box) or image.
"""
from typing import Callable, Tuple

import torch

from .point_ops import point_sample

__all__ = [
    "regular_grid_points",
    "uncertain_points_on_grid",
    "sample_training_points",
    "box_points_to_image",
]


def regular_grid_points(R: int, side: int, device, dtype=torch.float32) -> torch.Tensor:
    """
    Centres of the cells of a side x side grid, row by row.

    Returns:
        (R, side * side, 2) coordinates (x, y); the same grid for every region (a view).
    """
    c = (torch.arange(side, device=device, dtype=dtype) + 0.5) / side
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1)
    return grid.unsqueeze(0).expand(R, -1, -1)


def uncertain_points_on_grid(
    uncertainty: torch.Tensor, num_points: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The ``num_points`` cells of a grid with the highest uncertainty.

    Args:
        uncertainty: (R, 1, H, W) uncertainty per cell (higher = less certain).
        num_points: N; at most H * W cells are returned.

    Returns:
        indices: (R, min(N, HW)) flat cell indices in [0, H*W).
        coords: (R, min(N, HW), 2) the cell centres, (x, y) in [0, 1]^2.
    """
    R, _, H, W = uncertainty.shape
    n = min(int(num_points), H * W)
    indices = torch.topk(uncertainty.reshape(R, H * W), k=n, dim=1).indices
    coords = torch.stack(
        (
            ((indices % W).to(uncertainty.dtype) + 0.5) / W,
            (torch.div(indices, W, rounding_mode="floor").to(uncertainty.dtype) + 0.5) / H,
        ),
        dim=2,
    )
    return indices, coords


def sample_training_points(
    coarse_logits: torch.Tensor,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator = None,
) -> torch.Tensor:
    """
    The paper's biased random point selection for training: over-generate k*N uniform
    candidates, keep the beta*N most uncertain (uncertainty measured on the coarse logits
    interpolated at each candidate) and add (1 - beta)*N uniform points for coverage.

    Args:
        coarse_logits: (R, C, H, W) coarse predictions.
        uncertainty_fn: maps (R, C, P) point logits to (R, 1, P) uncertainties.
        num_points: N.
        oversample_ratio: k >= 1.
        importance_sample_ratio: beta in [0, 1].

    Returns:
        (R, N, 2) points in [0, 1]^2: the beta*N chosen candidates first (most uncertain
        first), then the uniform ones.
    """
    if oversample_ratio < 1:
        raise ValueError(f"POINTREND.OVERSAMPLE_RATIO (k) must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"POINTREND.IMPORTANCE_SAMPLE_RATIO (beta) must be in [0, 1], got {importance_sample_ratio}"
        )
    R = coarse_logits.shape[0]
    dev, dt = coarse_logits.device, coarse_logits.dtype
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_uncertain = min(num_uncertain, num_candidates)
    num_random = num_points - num_uncertain
    if R == 0:
        return torch.zeros(0, num_points, 2, device=dev, dtype=dt)
    candidates = torch.rand(R, num_candidates, 2, device=dev, dtype=dt, generator=generator)
    if num_uncertain == 0:
        chosen = candidates[:, :0]
    else:
        # Uncertainty of the interpolated logits, not interpolated uncertainty: a point
        # between a -1 and a +1 logit is maximally uncertain.
        unc = uncertainty_fn(point_sample(coarse_logits, candidates))[:, 0, :]
        top = torch.topk(unc, k=num_uncertain, dim=1).indices
        chosen = torch.gather(candidates, 1, top.unsqueeze(2).expand(-1, -1, 2))
    if num_random > 0:
        uniform = torch.rand(R, num_random, 2, device=dev, dtype=dt, generator=generator)
        chosen = torch.cat((chosen, uniform), dim=1)
    return chosen


def box_points_to_image(boxes: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """
    Box-relative points to absolute image coordinates.

    Args:
        boxes: (R, 4) boxes (x0, y0, x1, y1) in pixels.
        point_coords: (R, P, 2) points in [0, 1]^2 relative to each box.

    Returns:
        (R, P, 2) points in pixels, (x, y).
    """
    origin = boxes[:, None, 0:2]
    size = boxes[:, None, 2:4] - origin
    return origin + point_coords * size
