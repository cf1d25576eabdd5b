"""Instance-aware dynamic convolutions: every instance has its own small convolution.

Shape shorthand:
    R: number of instances;  N: number of images;  E: template channels (PointINS);
    B: output channels of the instance-aware convolution;  d: its kernel size (1 or 3);
    C: mask-feature channels;  H, W: height and width of the maps;
    P: dynamic parameters per instance (169 for CondInst's default head).

Two families, each a compiled op ``torch.ops.d2seg.*`` (CPU and CUDA) with a pure-PyTorch
reference of the same name + ``_reference`` (used by the tests, and as the fallback, logged
once with its reason, when the extension is missing). The compiled ops take float32,
float64, float16 and bfloat16 (the half types accumulate in float32 and return their own
dtype) and have an autocast policy (csrc/autocast.cpp; docs/mixed_precision.md):

* :func:`instance_aware_conv` (PointINS): per-instance input templates and weights.
* :func:`dynamic_mask_head` (CondInst): a stack of dynamic 1x1 convolutions applied to the
  mask features of the instance's image, with relative coordinates computed inside the
  kernel.

:func:`dynamic_kernel_product` (SparseInst / SOLOv2, the one-layer case without
coordinates) is not a compiled op: it is plain PyTorch (per-image matmuls), because the
BLAS already does this product at full speed (docs/ops.md).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .extension import autocast_on, compiled_dtype_ok, load_extension, use_compiled

__all__ = [
    "instance_aware_conv",
    "instance_aware_conv_reference",
    "dynamic_mask_head",
    "dynamic_mask_head_reference",
    "dynamic_mask_head_num_params",
    "parse_dynamic_params",
    "dynamic_kernel_product",
    "dynamic_kernel_product_reference",
]


def _check_same_device(name, *tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on the same device, got {sorted(map(str, devices))}")


# --------------------------------------------------------------------------------------
# instance_aware_conv (PointINS)
# --------------------------------------------------------------------------------------


def _check_instance_aware_conv(templates, weights, bias):
    if templates.dim() != 4:
        raise ValueError(f"instance_aware_conv: templates must be (R, E, K, K), got {tuple(templates.shape)}")
    if weights.dim() != 5:
        raise ValueError(f"instance_aware_conv: weights must be (R, B, E, d, d), got {tuple(weights.shape)}")
    R, E = templates.shape[:2]
    if weights.shape[0] != R or weights.shape[2] != E:
        raise ValueError(
            f"instance_aware_conv: weights {tuple(weights.shape)} do not match templates "
            f"{tuple(templates.shape)} (R and E must agree)"
        )
    d = weights.shape[3]
    if weights.shape[4] != d or d % 2 != 1 or d > 7:
        raise ValueError(f"instance_aware_conv: kernel must be square with odd size d <= 7, got {tuple(weights.shape[3:])}")
    if bias is not None and tuple(bias.shape) != (R, weights.shape[1]):
        raise ValueError(f"instance_aware_conv: bias must be (R, B) = {(R, weights.shape[1])}, got {tuple(bias.shape)}")
    _check_same_device("instance_aware_conv", templates, weights, bias)
    dtypes = {t.dtype for t in (templates, weights, bias) if t is not None}
    # under autocast the op's policy casts them to one dtype
    if len(dtypes) > 1 and not autocast_on(templates.device):
        raise ValueError(f"instance_aware_conv: all tensors must have the same dtype, got {dtypes}")


def instance_aware_conv_reference(templates, weights, bias=None):
    """The composite: one grouped ``F.conv2d`` with a group per instance."""
    R, E, H, W = templates.shape
    B, d = weights.shape[1], weights.shape[-1]
    if R == 0:
        return templates.new_zeros((0, B, H, W)) + weights.sum() * 0
    out = F.conv2d(
        templates.reshape(1, R * E, H, W),
        weights.reshape(R * B, E, d, d),
        None if bias is None else bias.reshape(R * B),
        padding=d // 2,
        groups=R,
    )
    return out.reshape(R, B, H, W)


def instance_aware_conv(
    templates: torch.Tensor, weights: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """PointINS's instance-aware convolution: instance r convolves its own templates with
    its own weights (padding d // 2, stride 1).

    Args:
        templates: (R, E, K, K) per-instance input (PointINS: E=9 templates of K=16).
        weights: (R, B, E, d, d) per-instance weights, d odd (PointINS: B=256, d=1).
        bias: optional (R, B).

    Returns:
        (R, B, K, K).
    """
    _check_instance_aware_conv(templates, weights, bias)
    if compiled_dtype_ok("instance_aware_conv", templates, weights, bias) and use_compiled(
        templates, weights, op="instance_aware_conv"
    ):
        return torch.ops.d2seg.instance_aware_conv(templates, weights, bias)
    return instance_aware_conv_reference(templates, weights, bias)


# --------------------------------------------------------------------------------------
# dynamic_mask_head (CondInst) and dynamic_kernel_product (SparseInst, SOLOv2)
# --------------------------------------------------------------------------------------


def _layer_shapes(in_channels, channels, num_layers):
    shapes = []
    for l in range(num_layers):
        cin = in_channels if l == 0 else channels
        cout = 1 if l == num_layers - 1 else channels
        shapes.append((cout, cin))
    return shapes


def dynamic_mask_head_num_params(in_channels: int, channels: int = 8, num_layers: int = 3) -> int:
    """Parameters per instance of the dynamic head; ``in_channels`` counts the relative
    coordinates (CondInst: 8 + 2 inputs, 8 channels, 3 layers -> 169)."""
    return sum(o * i + o for o, i in _layer_shapes(in_channels, channels, num_layers))


def parse_dynamic_params(params, in_channels, channels=8, num_layers=3):
    """Split (R, P) parameters in AdelaiDet CondInst's layout (all weights, then all
    biases; layer l's weights as (out, in) row-major) into per-layer (R, out, in) weights
    and (R, out) biases."""
    shapes = _layer_shapes(in_channels, channels, num_layers)
    sizes = [o * i for o, i in shapes] + [o for o, _ in shapes]
    chunks = torch.split(params, sizes, dim=1)
    weights = [c.reshape(-1, o, i) for c, (o, i) in zip(chunks[:num_layers], shapes)]
    biases = list(chunks[num_layers:])
    return weights, biases


def relative_coordinates(instance_locations, H, W, stride, scales=None):
    """(R, 2, H, W) relative coordinates (x, then y) of every pixel to each instance:
    (instance_location - (index * stride + stride // 2)) / scale."""
    dev, dt = instance_locations.device, instance_locations.dtype
    xs = torch.arange(W, device=dev, dtype=torch.int64).mul(stride).add(stride // 2).to(dt)
    ys = torch.arange(H, device=dev, dtype=torch.int64).mul(stride).add(stride // 2).to(dt)
    scale = torch.ones_like(instance_locations[:, 0]) if scales is None else scales
    rel_x = (instance_locations[:, 0, None] - xs[None]) / scale[:, None]  # (R, W)
    rel_y = (instance_locations[:, 1, None] - ys[None]) / scale[:, None]  # (R, H)
    R = instance_locations.shape[0]
    return torch.stack([rel_x[:, None, :].expand(R, H, W), rel_y[:, :, None].expand(R, H, W)], dim=1)


def dynamic_mask_head_reference(
    mask_feats, im_inds, params, channels=8, num_layers=3, instance_locations=None,
    mask_feat_stride=8, scales=None,
):
    """The composite people write (AdelaiDet's CondInst): gather each instance's mask
    features, concatenate the relative coordinates, and run the stack as grouped 1x1
    ``F.conv2d`` over the (1, R * (C + 2), H, W) batch."""
    N, C, H, W = mask_feats.shape
    R = params.shape[0]
    x = mask_feats[im_inds]
    if instance_locations is not None:
        rel = relative_coordinates(instance_locations, H, W, mask_feat_stride, scales)
        x = torch.cat([rel.to(x.dtype), x], dim=1)
    in_channels = x.shape[1]
    weights, biases = parse_dynamic_params(params, in_channels, channels, num_layers)
    if R == 0:
        return mask_feats.new_zeros((0, 1, H, W)) + params.sum() * 0
    x = x.reshape(1, R * in_channels, H, W)
    for l, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w.reshape(-1, w.shape[-1], 1, 1), b.reshape(-1), groups=R)
        if l < num_layers - 1:
            x = F.relu(x)
    return x.reshape(R, 1, H, W)


def _check_dynamic_mask_head(mask_feats, im_inds, params, channels, num_layers, instance_locations, scales):
    if mask_feats.dim() != 4:
        raise ValueError(f"dynamic_mask_head: mask_feats must be (N, C, H, W), got {tuple(mask_feats.shape)}")
    if params.dim() != 2:
        raise ValueError(f"dynamic_mask_head: params must be (R, P), got {tuple(params.shape)}")
    R = params.shape[0]
    if im_inds.dim() != 1 or im_inds.shape[0] != R:
        raise ValueError(f"dynamic_mask_head: im_inds must be (R,) with R={R}, got {tuple(im_inds.shape)}")
    if im_inds.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dynamic_mask_head: im_inds must be an integer tensor, got {im_inds.dtype}")
    if instance_locations is not None and tuple(instance_locations.shape) != (R, 2):
        raise ValueError(
            f"dynamic_mask_head: instance_locations must be (R, 2) = ({R}, 2), got {tuple(instance_locations.shape)}"
        )
    if scales is not None:
        if instance_locations is None:
            raise ValueError("dynamic_mask_head: scales are only used with instance_locations")
        if tuple(scales.shape) != (R,):
            raise ValueError(f"dynamic_mask_head: scales must be (R,) = ({R},), got {tuple(scales.shape)}")
    if not 1 <= num_layers <= 8 or not 1 <= channels <= 32:
        raise ValueError(f"dynamic_mask_head: need 1 <= num_layers <= 8 and 1 <= channels <= 32, got {num_layers}, {channels}")
    in_channels = mask_feats.shape[1] + (2 if instance_locations is not None else 0)
    expected = dynamic_mask_head_num_params(in_channels, channels, num_layers)
    if params.shape[1] != expected:
        raise ValueError(
            f"dynamic_mask_head: params must have {expected} values per instance for {num_layers} layers of "
            f"{channels} channels on {in_channels} inputs, got {params.shape[1]}"
        )
    _check_same_device("dynamic_mask_head", mask_feats, im_inds, params, instance_locations, scales)


def dynamic_mask_head(
    mask_feats: torch.Tensor,
    im_inds: torch.Tensor,
    params: torch.Tensor,
    channels: int = 8,
    num_layers: int = 3,
    instance_locations: Optional[torch.Tensor] = None,
    mask_feat_stride: int = 8,
    scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CondInst's dynamic mask head, fused: the (R, C + 2, H, W) input and the hidden
    (R, channels, H, W) activations are never materialised.

    Args:
        mask_feats: (N, C, H, W) mask-branch features of the image batch.
        im_inds: (R,) image index of each instance.
        params: (R, P) dynamic parameters in AdelaiDet's layout (see
            :func:`parse_dynamic_params`); P = (C + 2) * 8 + 8 * 8 + 8 + 8 + 8 + 1 = 169 for
            CondInst's default (C=8, channels=8, num_layers=3, with relative coordinates).
        channels: width of the hidden layers.
        num_layers: number of 1x1 layers (ReLU between them, none after the last).
        instance_locations: optional (R, 2) (x, y) location of each instance in input-image
            pixels; if given, two relative-coordinate channels (x then y) are prepended to
            the C feature channels: (instance_location - (index * stride + stride // 2)) / scale.
        mask_feat_stride: stride of mask_feats w.r.t. the input image.
        scales: optional (R,) sizes of interest dividing the relative coordinates (1 if None).

    Returns:
        (R, 1, H, W) mask logits. Differentiable w.r.t. mask_feats and params (the
        locations and scales are treated as constants).
    """
    _check_dynamic_mask_head(mask_feats, im_inds, params, channels, num_layers, instance_locations, scales)
    if compiled_dtype_ok("dynamic_mask_head", mask_feats, params) and use_compiled(
        mask_feats, params, op="dynamic_mask_head"
    ):
        dt = mask_feats.dtype
        # locations and scales: float32 beside float16 / bfloat16 features (pixel positions)
        lt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        if autocast_on(mask_feats.device):
            dt = params.dtype  # the op's autocast policy casts both
        return torch.ops.d2seg.dynamic_mask_head(
            mask_feats,
            im_inds.long(),
            params.to(dt),
            None if instance_locations is None else instance_locations.detach().to(lt),
            None if scales is None else scales.detach().to(lt),
            int(channels),
            int(num_layers),
            int(mask_feat_stride),
        )
    return dynamic_mask_head_reference(
        mask_feats, im_inds, params, channels, num_layers, instance_locations, mask_feat_stride, scales
    )


def dynamic_kernel_product_reference(kernels, features, im_inds):
    """out[r] = sum_c kernels[r, c] * features[im_inds[r], c]: per-image matmuls."""
    R, C = kernels.shape
    N, _, H, W = features.shape
    out = features.new_zeros((R, H * W)) + kernels.sum() * 0
    flat = features.reshape(N, C, H * W)
    for n in range(N):
        sel = (im_inds == n).nonzero().flatten()
        if sel.numel():
            out = out.index_copy(0, sel, kernels[sel] @ flat[n])
    return out.reshape(R, H, W)


def dynamic_kernel_product(kernels: torch.Tensor, features: torch.Tensor, im_inds: torch.Tensor) -> torch.Tensor:
    """SparseInst / SOLOv2's dynamic kernels applied to the mask features: a dynamic 1x1
    convolution with one output channel and no bias.

    Args:
        kernels: (R, C) one kernel per instance.
        features: (N, C, H, W) mask features of the batch.
        im_inds: (R,) image index of each instance.

    Returns:
        (R, H, W) mask logits.

    With C in the hundreds this is a matrix product that the BLAS already does at full
    speed, so it runs as per-image matmuls (see docs/ops.md for the measurement); it is the
    same computation as ``dynamic_mask_head(num_layers=1)`` with a zero bias.
    """
    if kernels.dim() != 2 or features.dim() != 4 or kernels.shape[1] != features.shape[1]:
        raise ValueError(
            f"dynamic_kernel_product: need kernels (R, C) and features (N, C, H, W) with the same C, "
            f"got {tuple(kernels.shape)} and {tuple(features.shape)}"
        )
    if im_inds.dim() != 1 or im_inds.shape[0] != kernels.shape[0]:
        raise ValueError(f"dynamic_kernel_product: im_inds must be (R,), got {tuple(im_inds.shape)}")
    _check_same_device("dynamic_kernel_product", kernels, features, im_inds)
    return dynamic_kernel_product_reference(kernels, features, im_inds)


# --------------------------------------------------------------------------------------
# autograd and fake (meta) implementations of the compiled ops
# --------------------------------------------------------------------------------------


def _register():
    if load_extension() is None:
        return
    lib = torch.library

    @lib.register_fake("d2seg::instance_aware_conv")
    def _(input, weight, bias):
        return input.new_empty((input.shape[0], weight.shape[1], input.shape[2], input.shape[3]))

    @lib.register_fake("d2seg::instance_aware_conv_backward")
    def _(grad_out, input, weight):
        return torch.empty_like(input), torch.empty_like(weight), input.new_empty(weight.shape[:2])

    def _iac_setup(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None

    def _iac_backward(ctx, grad):
        input, weight = ctx.saved_tensors
        gi, gw, gb = torch.ops.d2seg.instance_aware_conv_backward(grad, input, weight)
        return gi, gw, (gb if ctx.has_bias else None)

    lib.register_autograd("d2seg::instance_aware_conv", _iac_backward, setup_context=_iac_setup)

    @lib.register_fake("d2seg::dynamic_mask_head")
    def _(mask_feats, im_inds, params, instance_locations, scales, channels, num_layers, stride):
        return mask_feats.new_empty((params.shape[0], 1, mask_feats.shape[2], mask_feats.shape[3]))

    @lib.register_fake("d2seg::dynamic_mask_head_backward")
    def _(grad_out, mask_feats, im_inds, params, instance_locations, scales, channels, num_layers, stride):
        return torch.empty_like(mask_feats), torch.empty_like(params)

    def _dmh_setup(ctx, inputs, output):
        mask_feats, im_inds, params, locs, scales, channels, num_layers, stride = inputs
        ctx.save_for_backward(mask_feats, im_inds, params, locs, scales)
        ctx.config = (channels, num_layers, stride)

    def _dmh_backward(ctx, grad):
        mask_feats, im_inds, params, locs, scales = ctx.saved_tensors
        gf, gp = torch.ops.d2seg.dynamic_mask_head_backward(
            grad, mask_feats, im_inds, params, locs, scales, *ctx.config
        )
        return gf, None, gp, None, None, None, None, None

    lib.register_autograd("d2seg::dynamic_mask_head", _dmh_backward, setup_context=_dmh_setup)


_register()
