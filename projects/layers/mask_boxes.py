"""Tight boxes of binary masks, without a Python loop over the masks (Detectron2's
``BitMasks.get_bounding_boxes`` loops over them): the same boxes, XYXY with exclusive max
coordinates, zeros for an empty mask."""
import torch
from detectron2.structures import Boxes

__all__ = ["masks_to_boxes"]


def masks_to_boxes(masks: torch.Tensor) -> Boxes:
    """Tight XYXY boxes of binary masks (R, H, W) -> Boxes (R, 4); an empty mask gives zeros."""
    r, h, w = masks.shape
    if r == 0:
        return Boxes(torch.zeros(0, 4, device=masks.device))
    # any() along rows and columns; on bool masks as uint8 (the same bytes, 0 or 1), whose
    # max-reductions are several times faster than bool's any() on the CPU
    flags = masks.view(torch.uint8) if masks.dtype == torch.bool else masks != 0
    cols, rows = flags.amax(dim=1) > 0, flags.amax(dim=2) > 0  # (R, W), (R, H)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    big = float(max(h, w))
    x1 = torch.where(cols, xs, big).min(dim=1).values
    x2 = torch.where(cols, xs, -1.0).max(dim=1).values + 1
    y1 = torch.where(rows, ys, big).min(dim=1).values
    y2 = torch.where(rows, ys, -1.0).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    return Boxes(boxes * cols.any(dim=1, keepdim=True))
