"""The explicit instance information I^z = {I^o, I^q} of PointINS (paper eqs. 3-5).

Shape shorthand in this module:
    R: (point, anchor, target box) triples, U: length of I^z

For a point on a level of stride s, with anchor box (centre x^o, y^o, width w, height h)
and target box (centre x^q, y^q, width w^q, height h^q):

    I^o = {1/s, h/w, h/s, w/s}                               (eq. 3; anchor-free: {1/s})
    r^x = (x^q - x^o) / s,  r^y = (y^q - y^o) / s            (eq. 5)
    p^l = 0.5 w^q / s - r^x,  p^r = 0.5 w^q / s + r^x
    p^t = 0.5 h^q / s - r^y,  p^b = 0.5 h^q / s + r^y
    I^q = {r^x, r^y, p^l, p^r, p^b, p^t}                     (eq. 4, in this order)

p^l, p^r, p^t, p^b are the distances, in strides, from the anchor centre to the left,
right, top and bottom sides of the target box. For FCOS (anchor-free) the anchor is the
point itself and I^z = {1/s} + I^q (U = 7); for RetinaNet U = 4 + 6 = 10.
"""
from typing import Sequence

import torch
from torch import Tensor

from .config import INSTANCE_INFO_PARTS

__all__ = ["instance_info", "instance_info_size", "check_instance_info_parts"]


def check_instance_info_parts(parts: Sequence[str]) -> tuple:
    """Validate MODEL.POINTINS.INSTANCE_INFO; returns the parts as a tuple in canonical order."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in INSTANCE_INFO_PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"MODEL.POINTINS.INSTANCE_INFO must be distinct names among {list(INSTANCE_INFO_PARTS)}, "
            f"got {list(parts)}."
        )
    return tuple(p for p in INSTANCE_INFO_PARTS if p in parts)


def instance_info_size(parts: Sequence[str], anchor_free: bool) -> int:
    """U, the number of values of I^z for the given parts."""
    sizes = {"anchor": 1 if anchor_free else 4, "center_offset": 2, "edge_distances": 4}
    return sum(sizes[p] for p in check_instance_info_parts(parts))


def instance_info(
    anchors: Tensor,
    target_boxes: Tensor,
    strides: Tensor,
    parts: Sequence[str] = INSTANCE_INFO_PARTS,
    anchor_free: bool = False,
) -> Tensor:
    """I^z of R triples.

    Args:
        anchors: (R, 4) XYXY anchor boxes; for an anchor-free detector only their centres
            are used (pass the points as (x, y, x, y)).
        target_boxes: (R, 4) XYXY target boxes (anchor, ground truth or regressed box).
        strides: (R,) stride s of each point's level.
        parts: which parts of I^z to use, a subset of ("anchor", "center_offset",
            "edge_distances"); the output keeps this canonical order.
        anchor_free: I^o = {1/s} instead of {1/s, h/w, h/s, w/s}.
    Returns:
        (R, U) float.
    """
    parts = check_instance_info_parts(parts)
    if anchors.shape != target_boxes.shape or anchors.shape[-1] != 4:
        raise ValueError(
            f"instance_info: anchors {tuple(anchors.shape)} and target_boxes "
            f"{tuple(target_boxes.shape)} must both be (R, 4)."
        )
    s = strides.to(anchors.dtype)
    ax0, ay0, ax1, ay1 = anchors.unbind(dim=1)
    tx0, ty0, tx1, ty1 = target_boxes.unbind(dim=1)
    xo, yo = (ax0 + ax1) * 0.5, (ay0 + ay1) * 0.5
    xq, yq = (tx0 + tx1) * 0.5, (ty0 + ty1) * 0.5
    wq, hq = tx1 - tx0, ty1 - ty0
    rx, ry = (xq - xo) / s, (yq - yo) / s
    out = []
    if "anchor" in parts:
        out.append(1.0 / s)
        if not anchor_free:
            w, h = ax1 - ax0, ay1 - ay0
            out += [h / w.clamp(min=1e-6), h / s, w / s]
    if "center_offset" in parts:
        out += [rx, ry]
    if "edge_distances" in parts:
        half_w, half_h = 0.5 * wq / s, 0.5 * hq / s
        out += [half_w - rx, half_w + rx, half_h + ry, half_h - ry]  # p^l, p^r, p^b, p^t
    if not out:
        return anchors.new_zeros((anchors.shape[0], 0))
    return torch.stack(out, dim=1)
