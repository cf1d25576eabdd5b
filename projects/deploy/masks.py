"""Masks in the export graphs: :func:`mask_boxes`, the traceable box of binary masks (the boxes
of :func:`d2seg.layers.mask_boxes.masks_to_boxes`: tight XYXY, exclusive max, zeros for an
empty mask) without its Python branch on the number of masks and its size-derived constant, so
that the graph holds for any number of detections and any output size; :func:`paste_masks`,
Detectron2's pasting of box-relative masks into the image."""
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


def _bilinear_weights(coords: Tensor, size: int) -> Tensor:
    """grid_sample's 1-D bilinear weights (align_corners=False, zeros outside) as a matrix:
    normalised coordinates (R, n) in the input's [-1, 1] -> (R, n, size), row i holding the
    weights of the (at most two) cells that sample i reads, with grid_sample's arithmetic
    (position ``(c + 1) * size / 2 - 0.5``, weights ``floor + 1 - position`` and
    ``position - floor``); cells outside the input have no column (zero padding)."""
    pos = (coords + 1) * (size / 2) - 0.5
    lo = torch.floor(pos)
    w_hi = (pos - lo)[..., None]
    w_lo = ((lo + 1) - pos)[..., None]
    cells = torch.arange(size, dtype=torch.float32, device=coords.device)
    lo = lo[..., None]
    zero = torch.zeros((), dtype=torch.float32, device=coords.device)
    return torch.where(cells == lo, w_lo, zero) + torch.where(cells == lo + 1, w_hi, zero)


def paste_masks(masks: Tensor, boxes: Tensor, output_size: Tensor, threshold: float) -> Tensor:
    """Detectron2's ``paste_masks_in_image`` in a graph: box-relative mask probabilities
    (R, S, S) placed in their boxes (R, 4) of an image of ``output_size`` (2,) and thresholded
    (>= threshold) -> (R, Ho, Wo) bool. Every pixel samples the mask bilinearly (align_corners
    False, zeros outside), the values Detectron2's grid_sample computes; Detectron2 computes
    them on the region around the boxes only, and the pixels outside that region, more than
    half a mask cell outside every box, are below 0.5 here (the thresholds of the methods).

    The sampling grid of a box is separable (a pixel's x sample depends on its column only, its
    y sample on its row only), so the bilinear sampling is two matrix products,
    ``Wy (R, Ho, S) @ masks (R, S, S) @ Wx^T (R, S, Wo)``, with grid_sample's 1-D weights
    (:func:`_bilinear_weights`): the same values up to float rounding of the sum (~1e-6),
    without grid_sample's (R, Ho, Wo, 2) grid, which at 100 detections of an 800 x 1067 image
    is 0.7 GB that ONNX Runtime expands, concatenates and reads (docs/deploy.md, "Speed")."""
    masks = masks.to(torch.float32)
    ys = torch.arange(output_size[0], dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(output_size[1], dtype=torch.float32, device=masks.device) + 0.5
    x0, y0, x1, y1 = torch.split(boxes.to(torch.float32), 1, dim=1)  # (R, 1) each
    gy = (ys[None, :] - y0) / (y1 - y0) * 2 - 1  # (R, Ho), grid_sample's normalised coordinates
    gx = (xs[None, :] - x0) / (x1 - x0) * 2 - 1  # (R, Wo)
    wy = _bilinear_weights(gy, masks.shape[1])  # (R, Ho, S)
    wx = _bilinear_weights(gx, masks.shape[2])  # (R, Wo, S)
    pasted = torch.matmul(torch.matmul(wy, masks), wx.transpose(1, 2))  # (R, Ho, Wo)
    return pasted >= threshold
