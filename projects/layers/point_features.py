"""Bilinear point sampling (PointRend) through the compiled op ``torch.ops.d2seg.sample_points``.

Shape shorthand:
    N: number of images;  C: channels;  H, W: height and width of a feature map;
    R: number of boxes (regions);  P: points per image or per box.

* :func:`point_sample`: Detectron2 PointRend's helper (same signature and semantics:
  ``F.grid_sample(input, 2 * coords - 1, align_corners=False)``), image-normalised points.
* :func:`point_sample_boxes`: the region form PointRend needs: box-normalised points of R
  boxes sampled from one or more feature levels of each box's image, in one op per level
  (no per-image grid_sample batch, no concatenation of per-image results).
* :func:`point_sample_fine_grained_features`: Detectron2's function of that name on top of
  :func:`point_sample_boxes` (same arguments and results).
* :func:`get_uncertain_point_coords_with_randomness` (training) and
  :func:`get_uncertain_point_coords_on_grid` (inference, subdivision step): the PointRend
  paper's point selection, in PyTorch (a top-k over a few thousand values per box; see
  docs/ops.md for why it does not get a kernel).

Precision: the features may be float32, float64, float16 or bfloat16; the points (and boxes)
are float32 beside float16 / bfloat16 features, and the result has the features' dtype. Under
torch.autocast the features keep their dtype and the points become float32 (the op's
autocast policy, csrc/autocast.cpp).
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .extension import autocast_on, compiled_dtype_ok, load_extension, log_fallback, use_compiled

__all__ = [
    "point_sample",
    "point_sample_reference",
    "point_sample_boxes",
    "point_sample_boxes_reference",
    "point_sample_fine_grained_features",
    "get_uncertain_point_coords_with_randomness",
    "get_uncertain_point_coords_on_grid",
]

_HALF = (torch.float16, torch.bfloat16)


def _coords_dtype(features_dtype):
    """The dtype of point coordinates and boxes beside features of this dtype: float32 next
    to float16 / bfloat16 features (a bfloat16 coordinate in [0, 1] can be 1/256 of the map
    off), else the features' own dtype."""
    return torch.float32 if features_dtype in _HALF else features_dtype


def _half_on_cpu_outside_autocast(t):
    """Whether the pure-PyTorch fallback must sample ``t`` in float32: PyTorch 2.14's CPU
    grid_sample backward in float16/bfloat16 can crash the process (docs/ops.md). Under
    autocast PyTorch runs grid_sample in float32 itself."""
    return t.device.type == "cpu" and t.dtype in _HALF and not autocast_on(t.device)


def point_sample_reference(input, point_coords, **kwargs):
    """The composite: ``F.grid_sample`` on the grid ``2 * point_coords - 1``."""
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def _compiled_kwargs_ok(kwargs):
    return (
        kwargs.get("mode", "bilinear") == "bilinear"
        and kwargs.get("padding_mode", "zeros") == "zeros"
        and not kwargs.get("align_corners", False)
        and set(kwargs) <= {"mode", "padding_mode", "align_corners"}
    )


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinear features of ``input`` at real-valued points, Detectron2's ``point_sample``.

    Args:
        input: (N, C, H, W) feature maps.
        point_coords: (N, P, 2) or (N, Hg, Wg, 2) points (x, y) in [0, 1] x [0, 1],
            normalised so that (0, 0) and (1, 1) are the outer corners of the map; points
            outside are sampled with zero padding, as F.grid_sample does.
        kwargs: passed to F.grid_sample; anything other than bilinear / zeros /
            align_corners=False runs F.grid_sample itself.

    Returns:
        (N, C, P) or (N, C, Hg, Wg). Differentiable w.r.t. input and point_coords.
    """
    if input.dim() != 4:
        raise ValueError(f"point_sample: input must be (N, C, H, W), got {tuple(input.shape)}")
    if point_coords.dim() not in (3, 4) or point_coords.shape[-1] != 2 or point_coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"point_sample: point_coords must be (N, P, 2) or (N, Hg, Wg, 2) with N={input.shape[0]}, "
            f"got {tuple(point_coords.shape)}"
        )
    if input.device != point_coords.device:
        raise ValueError(f"point_sample: input and point_coords must be on the same device, got {input.device} and {point_coords.device}")
    if not _compiled_kwargs_ok(kwargs):
        log_fallback("point_sample", f"grid_sample options {kwargs} (the compiled op is bilinear, zeros, align_corners=False)")
    elif compiled_dtype_ok("point_sample", input, point_coords) and use_compiled(input, point_coords, op="point_sample"):
        if not autocast_on(input.device):
            point_coords = point_coords.to(_coords_dtype(input.dtype))
        shape = point_coords.shape
        flat = point_coords.reshape(shape[0], shape[1] * (shape[2] if point_coords.dim() == 4 else 1), 2)
        out = torch.ops.d2seg.sample_points(input, flat, None, None, 1.0)
        return out if point_coords.dim() == 3 else out.reshape(input.shape[:2] + shape[1:3])
    if _half_on_cpu_outside_autocast(input):  # float32 inside, the input's dtype out
        return point_sample_reference(input.float(), point_coords.float(), **kwargs).to(input.dtype)
    if input.dtype != point_coords.dtype and not autocast_on(input.device):
        point_coords = point_coords.to(input.dtype)  # grid_sample wants one dtype
    return point_sample_reference(input, point_coords, **kwargs)


def _check_boxes_args(features_list, boxes, batch_index, point_coords, feature_scales):
    if len(features_list) == 0 or len(features_list) != len(feature_scales):
        raise ValueError(
            f"point_sample_boxes: need one feature scale per feature map, got {len(features_list)} maps "
            f"and {len(feature_scales)} scales"
        )
    R = boxes.shape[0]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"point_sample_boxes: boxes must be (R, 4), got {tuple(boxes.shape)}")
    if tuple(batch_index.shape) != (R,):
        raise ValueError(f"point_sample_boxes: batch_index must be (R,) = ({R},), got {tuple(batch_index.shape)}")
    if point_coords.dim() != 3 or point_coords.shape[0] != R or point_coords.shape[2] != 2:
        raise ValueError(f"point_sample_boxes: point_coords must be (R, P, 2) with R={R}, got {tuple(point_coords.shape)}")
    for f in features_list:
        if f.dim() != 4:
            raise ValueError(f"point_sample_boxes: feature maps must be (N, C, H, W), got {tuple(f.shape)}")
        if f.device != boxes.device or f.device != point_coords.device or f.device != batch_index.device:
            raise ValueError("point_sample_boxes: feature maps, boxes, batch_index and point_coords must be on the same device")


def point_sample_boxes_reference(features_list, boxes, batch_index, point_coords, feature_scales):
    """The composite Detectron2 runs: per image, points to image coordinates, then one
    ``F.grid_sample`` per image and level, then concatenation."""
    R, P = point_coords.shape[:2]
    coords_wrt_image = point_coords.clone()
    coords_wrt_image[:, :, 0] = point_coords[:, :, 0] * (boxes[:, None, 2] - boxes[:, None, 0]) + boxes[:, None, 0]
    coords_wrt_image[:, :, 1] = point_coords[:, :, 1] * (boxes[:, None, 3] - boxes[:, None, 1]) + boxes[:, None, 1]
    C_total = sum(f.shape[1] for f in features_list)
    out = features_list[0].new_zeros((R, C_total, P))
    N = features_list[0].shape[0]
    for n in range(N):
        sel = (batch_index == n).nonzero().flatten()
        if sel.numel() == 0:
            continue
        per_level = []
        for f, s in zip(features_list, feature_scales):
            h, w = f.shape[-2:]
            scale = torch.tensor([w, h], device=f.device, dtype=point_coords.dtype) / s
            pts = coords_wrt_image[sel] / scale
            per_level.append(point_sample_reference(f[n : n + 1], pts.unsqueeze(0), align_corners=False)[0].transpose(0, 1))
        out = out.index_copy(0, sel, torch.cat(per_level, dim=1))
    return out


def point_sample_boxes(
    features_list: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    batch_index: torch.Tensor,
    point_coords: torch.Tensor,
    feature_scales: Sequence[float],
) -> torch.Tensor:
    """Bilinear features at box-normalised points of R boxes over an image batch.

    Args:
        features_list: feature maps, each (N, C_l, H_l, W_l), of the whole batch.
        boxes: (R, 4) boxes (x0, y0, x1, y1) in input-image pixels.
        batch_index: (R,) image of each box.
        point_coords: (R, P, 2) points (x, y) in [0, 1]^2 relative to their box.
        feature_scales: 1 / stride of each map (Detectron2's convention, e.g. 1/4 for p2).

    Returns:
        (R, sum_l C_l, P) features, the levels concatenated along channels, as Detectron2's
        point_sample_fine_grained_features: the image point (x, y) maps to pixel
        (x * scale - 0.5, y * scale - 0.5) of a level (align_corners=False). Differentiable
        w.r.t. the feature maps (boxes and points are treated as constants).
    """
    _check_boxes_args(features_list, boxes, batch_index, point_coords, feature_scales)
    if compiled_dtype_ok("point_sample_boxes", *features_list) and use_compiled(
        *features_list, op="point_sample_boxes"
    ):
        pts, b, idx = point_coords.detach(), boxes.detach(), batch_index.long()
        # per level, the points in the dtype its features want (float32 beside half types)
        outs = [
            torch.ops.d2seg.sample_points(
                f, pts.to(_coords_dtype(f.dtype)), b.to(_coords_dtype(f.dtype)), idx, float(s)
            )
            for f, s in zip(features_list, feature_scales)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if features_list and _half_on_cpu_outside_autocast(features_list[0]):  # float32 inside
        dtype = features_list[0].dtype
        return point_sample_boxes_reference([f.float() for f in features_list], boxes.float(), batch_index,
                                            point_coords.float(), feature_scales).to(dtype)
    return point_sample_boxes_reference(features_list, boxes, batch_index, point_coords, feature_scales)


def point_sample_fine_grained_features(features_list, feature_scales, boxes, point_coords):
    """Detectron2's function of this name: features of R boxes (a list of Boxes, one per
    image) at box-normalised points (R, P, 2).

    Returns:
        point_features: (R, C_total, P).
        point_coords_wrt_image: (R, P, 2) the points in image coordinates.
    """
    tensors = [b.tensor for b in boxes]
    cat_boxes = torch.cat(tensors, dim=0)
    batch_index = torch.cat(
        [torch.full((t.shape[0],), i, dtype=torch.int64, device=cat_boxes.device) for i, t in enumerate(tensors)]
    )
    with torch.no_grad():
        coords_wrt_image = point_coords.clone()
        coords_wrt_image[:, :, 0] = point_coords[:, :, 0] * (cat_boxes[:, None, 2] - cat_boxes[:, None, 0]) + cat_boxes[:, None, 0]
        coords_wrt_image[:, :, 1] = point_coords[:, :, 1] * (cat_boxes[:, None, 3] - cat_boxes[:, None, 1]) + cat_boxes[:, None, 1]
    feats = point_sample_boxes(features_list, cat_boxes, batch_index, point_coords, feature_scales)
    return feats, coords_wrt_image


def get_uncertain_point_coords_with_randomness(
    coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio
):
    """PointRend's training point selection: draw k*N uniform points, keep the beta*N most
    uncertain of them, and add (1 - beta)*N uniform points.

    Args:
        coarse_logits: (R, K, Hm, Wm) coarse predictions.
        uncertainty_func: maps (R, K, P) point logits to (R, 1, P) uncertainties (higher is
            more uncertain).
        num_points: N, points per box.
        oversample_ratio: k >= 1.
        importance_sample_ratio: beta in [0, 1].

    Returns:
        (R, N, 2) points in [0, 1]^2 relative to the box.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    R = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(R, num_sampled, 2, device=coarse_logits.device, dtype=coarse_logits.dtype)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    uncertainties = uncertainty_func(point_logits)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    point_coords = torch.gather(point_coords, 1, idx[:, :, None].expand(R, num_uncertain, 2))
    if num_random > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(R, num_random, 2, device=coarse_logits.device, dtype=coarse_logits.dtype)],
            dim=1,
        )
    return point_coords


def get_uncertain_point_coords_on_grid(uncertainty_map, num_points):
    """PointRend's inference point selection: the num_points most uncertain cells of a
    (R, 1, H, W) uncertainty map.

    Returns:
        point_indices: (R, P) flat indices (y * W + x) of the chosen cells, P = min(H*W, num_points).
        point_coords: (R, P, 2) their centres (x, y) in [0, 1]^2.
    """
    R, _, H, W = uncertainty_map.shape
    num_points = min(H * W, num_points)
    point_indices = torch.topk(uncertainty_map.reshape(R, H * W), k=num_points, dim=1)[1]
    point_coords = torch.zeros(R, num_points, 2, dtype=uncertainty_map.dtype, device=uncertainty_map.device)
    point_coords[:, :, 0] = 1.0 / (2 * W) + (point_indices % W).to(uncertainty_map.dtype) / W
    point_coords[:, :, 1] = 1.0 / (2 * H) + torch.div(point_indices, W, rounding_mode="floor").to(uncertainty_map.dtype) / H
    return point_indices, point_coords


def _register():
    if load_extension() is None or not hasattr(torch.ops.d2seg, "sample_points"):
        return
    lib = torch.library

    @lib.register_fake("d2seg::sample_points")
    def _(features, coords, boxes, batch_index, feature_scale):
        return features.new_empty((coords.shape[0], features.shape[1], coords.shape[1]))

    @lib.register_fake("d2seg::sample_points_backward")
    def _(grad_out, features, coords, boxes, batch_index, feature_scale, coords_grad):
        return torch.empty_like(features), torch.empty_like(coords)

    def _setup(ctx, inputs, output):
        features, coords, boxes, batch_index, feature_scale = inputs
        ctx.save_for_backward(features, coords, boxes, batch_index)
        ctx.feature_scale = feature_scale
        ctx.box_form = boxes is not None

    def _backward(ctx, grad):
        features, coords, boxes, batch_index = ctx.saved_tensors
        coords_grad = bool(ctx.needs_input_grad[1]) and not ctx.box_form
        gf, gc = torch.ops.d2seg.sample_points_backward(
            grad, features, coords, boxes, batch_index, ctx.feature_scale, coords_grad
        )
        return gf, (gc if coords_grad else None), None, None, None

    lib.register_autograd("d2seg::sample_points", _backward, setup_context=_setup)


_register()
