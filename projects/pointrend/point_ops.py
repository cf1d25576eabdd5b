"""The point-sampling ops PointRend runs on: one place that every sampling call goes through.

Shape shorthand:
    N: images (or regions) in the batch, C: channels, H, W: feature map size
    R: regions (boxes) over all images, P: points per region

Coordinates are normalised to [0, 1] x [0, 1] (x first), and sampling is bilinear with
``align_corners=False`` and zero padding, i.e. the same arithmetic as
``F.grid_sample(input, 2 * coords - 1)`` -- the convention of Detectron2's PointRend.

This module is a thin facade: it forwards to d2seg's compiled ops in ``d2seg.layers``
when they exist, and to ``F.grid_sample`` otherwise, so the rest of the method never
touches ``grid_sample`` itself.
"""
import torch
from torch.nn import functional as F

try:  # d2seg's compiled point-sampling ops (csrc/), when this checkout has them
    from d2seg.layers import point_sample as _compiled_point_sample
except ImportError:  # pragma: no cover - depends on the state of d2seg.layers
    _compiled_point_sample = None

__all__ = ["point_sample", "point_sample_per_image", "compiled_ops_in_use"]


def compiled_ops_in_use() -> bool:
    """Whether point sampling runs through d2seg.layers (else: F.grid_sample)."""
    return _compiled_point_sample is not None


def point_sample(input: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """
    Bilinear features at points.

    Args:
        input: (N, C, H, W) feature maps.
        point_coords: (N, P, 2) points in [0, 1] x [0, 1], one set per map.

    Returns:
        (N, C, P) features.
    """
    if input.dim() != 4 or point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(
            "point_sample: expected input (N, C, H, W) and point_coords (N, P, 2), got "
            f"{tuple(input.shape)} and {tuple(point_coords.shape)}"
        )
    if point_coords.dtype != input.dtype:
        point_coords = point_coords.to(input.dtype)
    if _compiled_point_sample is not None:
        return _compiled_point_sample(input, point_coords)
    out = F.grid_sample(input, 2.0 * point_coords.unsqueeze(2) - 1.0, align_corners=False)
    return out.squeeze(3)


def point_sample_per_image(
    features: torch.Tensor, point_coords: torch.Tensor, num_per_image
) -> torch.Tensor:
    """
    Sample, for each image, the points of its regions from that image's feature map.

    Args:
        features: (N, C, H, W) one feature map per image.
        point_coords: (R, P, 2) points in [0, 1]^2 relative to the whole feature map
            (not to the box); regions are ordered image by image.
        num_per_image: list of N ints, regions of each image (sum R).

    Returns:
        (C, R*P) features, channel-first: column r*P + p is point p of region r.
    """
    R, P, _ = point_coords.shape
    C = features.shape[1]
    if R == 0:
        return features.new_zeros((C, 0))
    outs = []
    for i, coords in enumerate(torch.split(point_coords, list(num_per_image))):
        n = coords.shape[0]
        if n == 0:
            continue
        # One call per image over all its n*P points.
        outs.append(point_sample(features[i : i + 1], coords.reshape(1, n * P, 2))[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
