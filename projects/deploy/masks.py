"""Traceable box of binary masks for the export graphs: the boxes of
:func:`d2seg.layers.mask_boxes.masks_to_boxes` (tight XYXY, exclusive max, zeros for an empty
mask) without its Python branch on the number of masks and its size-derived constant, so that
the graph holds for any number of detections and any output size."""
import torch
from torch import Tensor

__all__ = ["mask_boxes", "paste_masks"]

_FAR = 1e9  # beyond any image side: the min/max of a row or column with no pixel


def mask_boxes(masks: Tensor) -> Tensor:
    """(R, H, W) bool -> (R, 4) float32 boxes."""
    flags = masks.to(torch.uint8)
    col_any = flags.amax(dim=1)  # (R, W) 0/1
    cols = col_any > 0
    rows = flags.amax(dim=2) > 0  # (R, H)
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device)
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device)
    x1 = torch.where(cols, xs, torch.full_like(xs, _FAR)).amin(dim=1)
    x2 = torch.where(cols, xs, torch.full_like(xs, -1.0)).amax(dim=1) + 1
    y1 = torch.where(rows, ys, torch.full_like(ys, _FAR)).amin(dim=1)
    y2 = torch.where(rows, ys, torch.full_like(ys, -1.0)).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    return boxes * col_any.amax(dim=1, keepdim=True).to(torch.float32)


def paste_masks(masks: Tensor, boxes: Tensor, output_size: Tensor, threshold: float) -> Tensor:
    """Detectron2's ``paste_masks_in_image`` in a graph: box-relative mask probabilities
    (R, S, S) placed in their boxes (R, 4) of an image of ``output_size`` (2,) and thresholded
    (>= threshold) -> (R, Ho, Wo) bool. Every pixel samples the mask bilinearly (grid_sample,
    align_corners=False, zeros outside), the values Detectron2 computes; it computes them on
    the region around the boxes only, and the pixels outside that region, more than half a
    mask cell outside every box, are below 0.5 here (the thresholds of the methods)."""
    r = masks.shape[0]
    ys = torch.arange(output_size[0], dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(output_size[1], dtype=torch.float32, device=masks.device) + 0.5
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # (R, 1) each
    gy = (ys[None, :] - y0) / (y1 - y0) * 2 - 1  # (R, Ho)
    gx = (xs[None, :] - x0) / (x1 - x0) * 2 - 1  # (R, Wo)
    grid = torch.stack([gx[:, None, :].expand(r, gy.shape[1], gx.shape[1]),
                        gy[:, :, None].expand(r, gy.shape[1], gx.shape[1])], dim=3)
    pasted = torch.nn.functional.grid_sample(masks[:, None].to(torch.float32), grid, align_corners=False)
    return pasted[:, 0] >= threshold
