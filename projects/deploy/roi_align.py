"""RoIAlign for the export graphs that gives torchvision's ``roi_align(..., aligned=True,
sampling_ratio > 0)`` exactly, also where the sample points leave the feature map, from plain
tensor ops (index arithmetic, Gather, Where): no ONNX RoiAlign.

ONNX Runtime's RoiAlign treats sample points outside the map otherwise than torchvision's
kernels, which matters for boxes that leave the image (BlendMask's crops with the boxes as
regressed, MODEL.BLENDMASK.CROP_UNCLIPPED_BOXES). torchvision's rules (its CPU and CUDA
kernels, ``bilinear_interpolate``), for each sample coordinate y (x likewise) on a map of
height H:
    y < -1 or y > H   the sample contributes 0 (all four weights 0);
    y <= 0            y = 0;
    y_low = int(y) >= H - 1   y_low = y_high = H - 1 and y = H - 1 (weight on one row);
    otherwise         y_high = y_low + 1;
bilinear weights (1 - ly)(1 - lx), (1 - ly) lx, ly (1 - lx), ly lx with ly = y - y_low, and
each output cell is the mean over its sampling_ratio x sampling_ratio grid. Box corners are
``box * spatial_scale - 0.5`` (aligned), with no minimum size.

The rules are per axis, so the weights are computed per axis and multiplied; an invalid
axis gives both its weights 0, which zeroes the sample as the kernel does.

Shape shorthand: N images, C channels, H x W the map, R boxes, S the output side, g the
sampling ratio.
"""
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["roi_align_exact"]


def _sample_coords(start: Tensor, length: Tensor, size: int, ratio: int) -> Tensor:
    """(R, S * g) sample coordinates along one axis: start + p * bin + (i + 0.5) * bin / g
    for cell p and grid point i (the kernel's order of operations)."""
    bin_size = length / size  # (R,)
    p = torch.arange(size, dtype=start.dtype, device=start.device)  # (S,)
    i = torch.arange(ratio, dtype=start.dtype, device=start.device) + 0.5  # (g,)
    coords = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
              + i[None, None, :] * bin_size[:, None, None] / ratio)  # (R, S, g)
    return coords.reshape(coords.shape[0], size * ratio)


def _axis_weights(coords: Tensor, length: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's rules on one axis of ``length`` (0-d int64 tensor, dynamic in the graph).
    coords (R, P) -> low, high (R, P) int64 indices and their weights (R, P), 0 where the sample
    is outside [-1, length]."""
    last = length - 1
    limit = length.to(coords.dtype)
    valid = (coords >= -1.0) & (coords <= limit)
    c = coords.clamp(min=0.0)
    low = c.floor().to(torch.int64)  # c >= 0: floor is the kernel's truncation
    at_end = low >= last
    low = torch.where(at_end, last, low)
    high = torch.where(at_end, last, low + 1)
    c = torch.where(at_end, low.to(coords.dtype), c)
    frac = c - low.to(coords.dtype)
    zero = torch.zeros_like(frac)
    return low, high, torch.where(valid, 1.0 - frac, zero), torch.where(valid, frac, zero)


def roi_align_exact(features: Tensor, boxes: Tensor, batch_inds: Tensor, output_size: int,
                    spatial_scale: float, sampling_ratio: int) -> Tensor:
    """torchvision's ``roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned=True)`` with rois = [batch_inds, boxes] (module doc).

    Args:
        features: (N, C, H, W) float.
        boxes: (R, 4) XYXY in input pixels (scaled by ``spatial_scale`` to the map).
        batch_inds: (R,) integer, the image of each box.
        output_size: S (square output).
        spatial_scale: map pixels per input pixel.
        sampling_ratio: g > 0 sample points per cell and axis (torchvision's adaptive
            ratio, <= 0, has a data-dependent grid and is not supported).
    Returns:
        (R, C, S, S), features.dtype.
    """
    if int(sampling_ratio) <= 0:
        raise ValueError(f"roi_align_exact: sampling_ratio must be > 0 (the adaptive grid of torchvision's "
                         f"sampling_ratio <= 0 is not supported), got {sampling_ratio}")
    S, g = int(output_size), int(sampling_ratio)
    dtype = features.dtype
    shape = torch._shape_as_tensor(features)  # dynamic H, W in the graph
    h, w = shape[2], shape[3]
    boxes = boxes.to(dtype)
    start = boxes * spatial_scale - 0.5  # (R, 4): x0, y0, x1, y1 on the map, half-pixel aligned
    x0, y0, x1, y1 = start[:, 0], start[:, 1], start[:, 2], start[:, 3]
    ylow, yhigh, wy_low, wy_high = _axis_weights(_sample_coords(y0, y1 - y0, S, g), h)  # (R, S*g)
    xlow, xhigh, wx_low, wx_high = _axis_weights(_sample_coords(x0, x1 - x0, S, g), w)

    # the map as rows of C values, indexed by (image, y, x) flattened
    c = features.shape[1]
    table = features.permute(0, 2, 3, 1).reshape(-1, c)  # (N*H*W, C)
    base = batch_inds.to(torch.int64)[:, None, None] * (h * w)  # (R, 1, 1)

    def corner(yi: Tensor, xi: Tensor) -> Tensor:
        idx = base + yi[:, :, None] * w + xi[:, None, :]  # (R, S*g, S*g)
        return table[idx.reshape(-1)].reshape(idx.shape[0], S * g, S * g, c)

    def weight(wy: Tensor, wx: Tensor) -> Tensor:
        return (wy[:, :, None] * wx[:, None, :])[..., None]  # (R, S*g, S*g, 1)

    val = (weight(wy_low, wx_low) * corner(ylow, xlow) + weight(wy_low, wx_high) * corner(ylow, xhigh)
           + weight(wy_high, wx_low) * corner(yhigh, xlow) + weight(wy_high, wx_high) * corner(yhigh, xhigh))
    if g > 1:
        val = val.reshape(-1, S, g, S, g, c).sum(dim=(2, 4)) / float(g * g)
    return val.reshape(-1, S, S, c).permute(0, 3, 1, 2)
