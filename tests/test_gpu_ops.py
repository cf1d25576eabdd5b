"""The CUDA kernels of d2seg._C, on a GPU: every op (``torch.ops.d2seg.*`` and its
``*_backward``) and every Python wrapper (``d2seg.layers.*``, forward and backward through
autograd) compared with

  (a) the CPU kernel on the same inputs (for float16 / bfloat16 inputs: the float32 CPU
      kernel on the same values upcast, which is exact), and
  (b) the independent pure-PyTorch composite (``*_reference`` in d2seg.layers, run in
      float64 on the CPU on the same values upcast; where the composite cannot run, i.e.
      zero-size maps, the answer written out by hand),

over the shape grid of the CPU tests (tests/test_ops_dynamic_conv.py,
tests/test_ops_point_sample.py): kernel sizes d = 1, 3, 5, 7 with and without bias, odd
sizes, a single pixel, empty inputs (R = 0, P = 0, zero-size maps), large R (2000), both
forms of point sampling, the fused dynamic head with 1..8 layers of 8 and of 5 channels
(and 1 and 32) with and without relative coordinates and scales; in float32, float64,
float16 and bfloat16, with the float32 locations / coordinates the ops accept next to
float16 / bfloat16 data; plus ``torch.autograd.gradcheck`` in float64 on the GPU,
non-contiguous inputs, and a check that the wrappers run the compiled op in every dtype.

Without CUDA (``torch.cuda.is_available()`` False, or ``d2seg._C.has_cuda()`` False) the
module is skipped, with the reason; with ``D2SEG_REQUIRE_CUDA=1`` (tools/gpu_check.py sets
it) it fails at collection instead. ``D2SEG_GPU_TESTS_DEVICE=cpu`` runs the same checks with
the CPU as the device under test: only for checking these tests themselves on a machine
without a GPU.

Tolerances. A value r of dtype T from the device is compared with an expected value e as
``|r - e| <= atol + rtol * |e|`` (torch.testing.assert_close), with, for T = float16 /
bfloat16, rtol = eps(T) (9.8e-4 / 7.8e-3): the kernels compute in float32 and round once
to T, an error of at most eps(T) / 2 of the value; for T = float32 / float64, rtol =
16 eps(T); and atol = 16 sqrt(n) eps(c) max|e| + tiny(T) eps(T), where c is the dtype the
kernels compute in (float64 for float64 data, else float32), n the number of terms summed
into one value (float32 sums in another order differ by about sqrt(n) rounding errors of
the largest values; 16 is the margin) and the last term the spacing of float16's
subnormals. A wrong value (a missing term, a wrong border) is off by about one term, far
more than these.

Point coordinates of the image form are multiples of 1/256, so that ``x * W - 0.5`` is
exact in every dtype and on every device: the coordinate gradient jumps at pixel borders,
and a point one rounding error from a border would otherwise take either side.
"""
import math
import os
import zlib

import pytest
import torch

from d2seg.layers import dynamic_conv as dc
from d2seg.layers import point_features as pf
from d2seg.layers.extension import extension_error, load_extension

DEVICE = os.environ.get("D2SEG_GPU_TESTS_DEVICE", "cuda")


def _why_not_runnable():
    ext = load_extension()
    if ext is None:
        return f"d2seg._C is not importable ({extension_error()}); build it with `make build`"
    if DEVICE != "cuda":
        return None
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU visible to PyTorch, or a CPU-only torch)"
    if not ext.has_cuda():
        return "d2seg._C was built without CUDA kernels (build them with `FORCE_CUDA=1 make build`)"
    return None


_REASON = _why_not_runnable()
if _REASON is not None:
    if os.environ.get("D2SEG_REQUIRE_CUDA") == "1":
        pytest.fail(f"D2SEG_REQUIRE_CUDA=1 but the CUDA kernels cannot run: {_REASON}", pytrace=False)
    pytestmark = pytest.mark.skip(reason=f"CUDA kernels cannot run here: {_REASON}")

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
HALF = (f16, bf16)
DTYPES = [f32, f64, f16, bf16]
# (data dtype, dtype of the locations / scales / point coordinates / boxes)
DTYPE_PAIRS = [(f32, f32), (f64, f64), (f16, f16), (f16, f32), (bf16, bf16), (bf16, f32)]


def _name(dt):
    return str(dt).replace("torch.", "")


def _pair_id(pair):
    return _name(pair[0]) if pair[0] == pair[1] else f"{_name(pair[0])}+{_name(pair[1])}"


def compute_dtype(dt):
    """The dtype the kernels compute in for data of dtype dt."""
    return f64 if dt == f64 else f32


def gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=f64)


def dev(t):
    return None if t is None else t.to(DEVICE)


def up(t, dt):
    return None if t is None else t.to(dt)


def close(actual, expected, data_dtype, n, what):
    """actual (from the device under test) against expected (CPU), see the module doc."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    t = torch.finfo(actual.dtype)
    c = torch.finfo(compute_dtype(data_dtype))
    scale = e.abs().max().item()
    atol = 16 * math.sqrt(max(n, 1)) * c.eps * scale + t.tiny * t.eps
    rtol = t.eps if actual.dtype in HALF else 16 * t.eps
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_device_and_dtype(tensors, dtypes, what):
    for t, dt in zip(tensors, dtypes):
        assert t.device.type == DEVICE, f"{what}: result on {t.device}, expected {DEVICE}"
        assert t.dtype == dt, f"{what}: result of dtype {t.dtype}, expected {dt}"


def _grads(out, inputs, grad_out):
    gs = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


# ------------------------------------ instance_aware_conv ---------------------------------

IAC_SHAPES = {  # (R, E, H, W, B)
    "typical": (3, 9, 16, 16, 20),
    "odd": (2, 3, 7, 5, 6),
    "one_pixel": (2, 2, 1, 1, 3),
    "R0": (0, 4, 5, 6, 3),
    "E0": (2, 0, 5, 6, 3),
    "H0": (2, 3, 0, 5, 4),
    "W0": (2, 3, 4, 0, 4),
    "large_R": (2000, 3, 9, 11, 5),
}


def _iac_expected(x, w, b, go):
    """Output and gradients (input, weight, bias) in float64 from the grouped-conv composite;
    by hand where it cannot run (no pixels or no input channels)."""
    R, E, H, W = x.shape
    gb = go.sum((2, 3))
    if R * E * H * W == 0:
        out = x.new_zeros((R, w.shape[1], H, W))
        if b is not None:
            out = out + b[:, :, None, None]
        return out, torch.zeros_like(x), torch.zeros_like(w), gb
    inputs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    out = dc.instance_aware_conv_reference(inputs[0], inputs[1], b)
    gx, gw = _grads(out, inputs, go)
    return out.detach(), gx, gw, gb


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("d", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", list(IAC_SHAPES.values()), ids=list(IAC_SHAPES))
def test_instance_aware_conv(shape, d, bias, dtype):
    R, E, H, W, B = shape
    g = gen("iac", shape, d, bias)
    x = randn(g, R, E, H, W).to(dtype)
    w = (randn(g, R, B, E, d, d) / math.sqrt(max(E * d * d, 1))).to(dtype)
    b = randn(g, R, B).to(dtype) if bias else None
    go = randn(g, R, B, H, W).to(dtype)
    n = max(E * d * d + 1, H * W, B * d * d)
    names = ["output", "input grad", "weight grad", "bias grad"]
    expected = _iac_expected(x.double(), w.double(), up(b, f64), go.double())
    cd = compute_dtype(dtype)
    cpu = [torch.ops.d2seg.instance_aware_conv(x.to(cd), w.to(cd), up(b, cd))]
    cpu += list(torch.ops.d2seg.instance_aware_conv_backward(go.to(cd), x.to(cd), w.to(cd)))

    # the ops themselves
    got = [torch.ops.d2seg.instance_aware_conv(dev(x), dev(w), dev(b))]
    got += list(torch.ops.d2seg.instance_aware_conv_backward(dev(go), dev(x), dev(w)))
    _check_device_and_dtype(got, [dtype] * 4, "instance_aware_conv")
    for name, a, c, e in zip(names, got, cpu, expected):
        close(a, c, dtype, n, f"op {name} vs the CPU kernel")
        close(a, e, dtype, n, f"op {name} vs the composite")

    # the wrapper, through autograd
    inputs = [dev(x).requires_grad_(), dev(w).requires_grad_()] + ([dev(b).requires_grad_()] if bias else [])
    out = dc.instance_aware_conv(*inputs)
    got = [out] + _grads(out, inputs, dev(go))
    _check_device_and_dtype(got, [dtype] * len(got), "d2seg.layers.instance_aware_conv")
    for name, a, e in zip(names, got, expected):
        close(a, e, dtype, n, f"d2seg.layers.instance_aware_conv {name} vs the composite")


# ------------------------------------- dynamic_mask_head ----------------------------------


def _dmh_check(N, C, H, W, R, channels, num_layers, rel, pair, seed, no_kinks=False):
    """The op and the wrapper against the CPU kernel and the composite. rel: "none" (no
    relative coordinates), "rel" (locations, no scales) or "rel_scales".

    no_kinks: parameters that keep every hidden pre-activation far from 0 (first-layer
    biases of +20, later layers' weights and biases positive). A pre-activation within a
    rounding error of 0 takes either side of the ReLU depending on the order of the
    float32 sums, which changes the gradients by a whole term; with millions of them
    (R = 2000) that was seen once in the 12 large-R cases of one run."""
    dtype, aux = pair
    stride = 4
    g = gen("dmh", seed)
    feats = randn(g, N, C, H, W).to(dtype)
    inds = torch.randint(0, N, (R,), generator=g)
    cin = C + (0 if rel == "none" else 2)
    P = dc.dynamic_mask_head_num_params(cin, channels, num_layers)
    params = randn(g, R, P) * 0.5
    if no_kinks and num_layers > 1:
        weights, biases = dc.parse_dynamic_params(params, cin, channels, num_layers)  # views
        biases[0] += 20
        for w, b in zip(weights[1:], biases[1:]):
            w.abs_()
            b.abs_().add_(1)
    params = params.to(dtype)
    locs = (torch.rand(R, 2, generator=g, dtype=f64) * stride * max(H, W, 1)).to(aux) if rel != "none" else None
    scales = (torch.rand(R, generator=g, dtype=f64) * 64 + 16).to(aux) if rel == "rel_scales" else None
    go = randn(g, R, 1, H, W).to(dtype)
    cfg = (channels, num_layers, stride)
    n = max(H * W, R) * num_layers * max(cin, channels)
    names = ["output", "mask_feats grad", "params grad"]

    if R * H * W == 0:
        expected = [feats.new_zeros((R, 1, H, W), dtype=f64), torch.zeros_like(feats, dtype=f64),
                    torch.zeros_like(params, dtype=f64)]
    else:
        inputs = [feats.double().requires_grad_(), params.double().requires_grad_()]
        out = dc.dynamic_mask_head_reference(
            inputs[0], inds, inputs[1], channels, num_layers, up(locs, f64), stride, up(scales, f64))
        expected = [out.detach()] + _grads(out, inputs, go.double())
    cd = compute_dtype(dtype)
    cpu_args = (feats.to(cd), inds, params.to(cd), up(locs, cd), up(scales, cd)) + cfg
    cpu = [torch.ops.d2seg.dynamic_mask_head(*cpu_args)]
    cpu += list(torch.ops.d2seg.dynamic_mask_head_backward(go.to(cd), *cpu_args))

    # the ops themselves
    args = (dev(feats), dev(inds), dev(params), dev(locs), dev(scales)) + cfg
    got = [torch.ops.d2seg.dynamic_mask_head(*args)]
    got += list(torch.ops.d2seg.dynamic_mask_head_backward(dev(go), *args))
    _check_device_and_dtype(got, [dtype] * 3, "dynamic_mask_head")
    for name, a, c, e in zip(names, got, cpu, expected):
        close(a, c, dtype, n, f"op {name} vs the CPU kernel")
        close(a, e, dtype, n, f"op {name} vs the composite")

    # the wrapper, through autograd
    inputs = [dev(feats).requires_grad_(), dev(params).requires_grad_()]
    out = dc.dynamic_mask_head(inputs[0], dev(inds), inputs[1], channels=channels, num_layers=num_layers,
                               instance_locations=dev(locs), mask_feat_stride=stride, scales=dev(scales))
    got = [out] + _grads(out, inputs, dev(go))
    _check_device_and_dtype(got, [dtype] * 3, "d2seg.layers.dynamic_mask_head")
    for name, a, e in zip(names, got, expected):
        close(a, e, dtype, n, f"d2seg.layers.dynamic_mask_head {name} vs the composite")


REL = ["none", "rel", "rel_scales"]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("rel", REL)
@pytest.mark.parametrize("channels", [8, 5])
@pytest.mark.parametrize("num_layers", range(1, 9))
def test_dynamic_mask_head_layers_and_widths(num_layers, channels, rel, pair):
    _dmh_check(2, 8, 7, 13, 5, channels, num_layers, rel, pair, seed=(num_layers, channels, rel))


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("num_layers", [1, 2, 8])
@pytest.mark.parametrize("channels", [1, 32])
def test_dynamic_mask_head_narrowest_and_widest(channels, num_layers, pair):
    _dmh_check(2, 6, 5, 9, 4, channels, num_layers, "rel_scales", pair, seed=("edge", channels, num_layers))


DMH_SHAPES = {  # (N, C, H, W, R)
    "odd": (3, 3, 9, 11, 4),
    "wide_features": (2, 16, 6, 5, 3),
    "one_pixel": (1, 4, 1, 1, 3),
    "R0": (2, 8, 6, 7, 0),
    "H0": (2, 8, 0, 5, 3),
    "W0": (2, 8, 4, 0, 3),
    "large_R": (2, 8, 12, 17, 2000),
}


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("rel", ["none", "rel_scales"])
@pytest.mark.parametrize("shape", list(DMH_SHAPES.values()), ids=list(DMH_SHAPES))
def test_dynamic_mask_head_shapes(shape, rel, pair):
    N, C, H, W, R = shape
    _dmh_check(N, C, H, W, R, 8, 3, rel, pair, seed=("shape", shape, rel), no_kinks=R > 100)


# --------------------------------------- point sampling -----------------------------------

# exact in every dtype (multiples of 1/16): corners, borders, centre, outside, far outside
SPECIAL_POINTS = [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.25, 0.5], [1.25, 0.375],
                  [0.5, -0.0625], [0.5, 1.0625], [-2.0, -2.0], [0.5, 0.5], [0.75, 0.125]]


def _image_points(g, N, P):
    """(N, P, 2) float64 points, multiples of 1/256 in [-0.25, 1.25], the special points first."""
    pts = torch.randint(-64, 321, (N, P, 2), generator=g).to(f64) / 256
    k = min(P, len(SPECIAL_POINTS))
    if k:
        pts[:, :k] = torch.tensor(SPECIAL_POINTS[:k], dtype=f64)
    return pts


SP_IMAGE_SHAPES = {  # (N, C, H, W, P)
    "typical": (2, 5, 9, 9, 30),
    "odd": (3, 3, 7, 13, 17),
    "pow2": (2, 4, 8, 16, 25),
    "one_pixel": (1, 2, 1, 1, 12),
    "N0": (0, 4, 5, 5, 3),
    "P0": (2, 4, 5, 5, 0),
    "C0": (2, 0, 5, 5, 7),
    "H0": (2, 3, 0, 5, 7),
    "W0": (2, 3, 5, 0, 7),
    "large": (2, 16, 25, 34, 2000),
}


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("shape", list(SP_IMAGE_SHAPES.values()), ids=list(SP_IMAGE_SHAPES))
def test_sample_points_image_form(shape, pair):
    dtype, cdt = pair
    N, C, H, W, P = shape
    g = gen("sp_image", shape)
    feats = randn(g, N, C, H, W).to(dtype)
    pts = _image_points(g, N, P).to(cdt)
    go = randn(g, N, C, P).to(dtype)
    n = 4 * max(C, P * N)
    names = ["output", "features grad", "coords grad"]
    if N * C * H * W * P == 0:
        expected = [feats.new_zeros((N, C, P), dtype=f64), torch.zeros_like(feats, dtype=f64),
                    torch.zeros_like(pts, dtype=f64)]
    else:
        inputs = [feats.double().requires_grad_(), pts.double().requires_grad_()]
        out = pf.point_sample_reference(inputs[0], inputs[1], align_corners=False)
        expected = [out.detach()] + _grads(out, inputs, go.double())
    cd = compute_dtype(dtype)
    cpu = [torch.ops.d2seg.sample_points(feats.to(cd), pts.to(cd), None, None, 1.0)]
    cpu += list(torch.ops.d2seg.sample_points_backward(go.to(cd), feats.to(cd), pts.to(cd), None, None, 1.0, True))

    got = [torch.ops.d2seg.sample_points(dev(feats), dev(pts), None, None, 1.0)]
    got += list(torch.ops.d2seg.sample_points_backward(dev(go), dev(feats), dev(pts), None, None, 1.0, True))
    _check_device_and_dtype(got, [dtype, dtype, cdt], "sample_points")
    for name, a, c, e in zip(names, got, cpu, expected):
        close(a, c, dtype, n, f"op {name} vs the CPU kernel")
        close(a, e, dtype, n, f"op {name} vs the composite")

    inputs = [dev(feats).requires_grad_(), dev(pts).requires_grad_()]
    out = pf.point_sample(*inputs)
    got = [out] + _grads(out, inputs, dev(go))
    _check_device_and_dtype(got, [dtype, dtype, cdt], "d2seg.layers.point_sample")
    for name, a, e in zip(names, got, expected):
        close(a, e, dtype, n, f"d2seg.layers.point_sample {name} vs the composite")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
def test_point_sample_grid_of_points(pair):
    """point_sample with (N, Hg, Wg, 2) points gives (N, C, Hg, Wg), as F.grid_sample."""
    dtype, cdt = pair
    g = gen("sp_grid")
    feats = randn(g, 2, 3, 6, 10).to(dtype)
    pts = _image_points(g, 2, 12).reshape(2, 3, 4, 2).to(cdt)
    go = randn(g, 2, 3, 3, 4).to(dtype)
    inputs = [feats.double().requires_grad_(), pts.double().requires_grad_()]
    ref = pf.point_sample_reference(inputs[0], inputs[1], align_corners=False)
    expected = [ref.detach()] + _grads(ref, inputs, go.double())
    inputs = [dev(feats).requires_grad_(), dev(pts).requires_grad_()]
    out = pf.point_sample(*inputs)
    got = [out] + _grads(out, inputs, dev(go))
    _check_device_and_dtype(got, [dtype, dtype, cdt], "d2seg.layers.point_sample")
    for name, a, e in zip(["output", "features grad", "coords grad"], got, expected):
        close(a, e, dtype, 12, f"d2seg.layers.point_sample (grid) {name} vs the composite")


SP_BOX_SHAPES = {  # (N, C, H, W, R, P, feature_scale)
    "p2": (3, 4, 16, 20, 7, 11, 1 / 4),
    "p3": (3, 2, 8, 10, 7, 11, 1 / 8),
    "odd": (2, 3, 7, 13, 5, 9, 1 / 8),
    "one_pixel": (2, 2, 1, 1, 4, 6, 1 / 32),
    "R0": (3, 4, 16, 20, 0, 11, 1 / 4),
    "P0": (3, 4, 16, 20, 5, 0, 1 / 4),
    "H0": (2, 3, 0, 5, 4, 6, 1 / 4),
    "large_R": (2, 16, 25, 34, 2000, 49, 1 / 4),
}


def _boxes(g, N, H, W, R, scale):
    """(R, 4) float64 boxes over an image of the map's size / scale (some partly outside),
    and (R,) image indices."""
    size = torch.tensor([max(W, 1) / scale, max(H, 1) / scale], dtype=f64)
    xy = torch.rand(R, 2, generator=g, dtype=f64) * (size + 10) - 5
    wh = torch.rand(R, 2, generator=g, dtype=f64) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1), torch.randint(0, N, (R,), generator=g)


def _box_points(g, R, P):
    pts = torch.rand(R, P, 2, generator=g, dtype=f64)
    k = min(P, 4)
    if R and k:
        pts[0, :k] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]][:k], dtype=f64)
    return pts


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("shape", list(SP_BOX_SHAPES.values()), ids=list(SP_BOX_SHAPES))
def test_sample_points_box_form(shape, pair):
    dtype, cdt = pair
    N, C, H, W, R, P, scale = shape
    g = gen("sp_box", shape)
    feats = randn(g, N, C, H, W).to(dtype)
    boxes, bi = _boxes(g, N, H, W, R, scale)
    boxes, pts = boxes.to(cdt), _box_points(g, R, P).to(cdt)
    go = randn(g, R, C, P).to(dtype)
    n = 4 * max(C, R * P)
    names = ["output", "features grad"]
    if R * P * C * H * W == 0:
        expected = [feats.new_zeros((R, C, P), dtype=f64), torch.zeros_like(feats, dtype=f64)]
    else:
        f = feats.double().requires_grad_()
        out = pf.point_sample_boxes_reference([f], boxes.double(), bi, pts.double(), [scale])
        expected = [out.detach()] + _grads(out, [f], go.double())
    cd = compute_dtype(dtype)
    cpu_args = (feats.to(cd), pts.to(cd), boxes.to(cd), bi, scale)
    cpu = [torch.ops.d2seg.sample_points(*cpu_args)]
    cpu += list(torch.ops.d2seg.sample_points_backward(go.to(cd), *cpu_args, False))[:1]

    args = (dev(feats), dev(pts), dev(boxes), dev(bi), scale)
    got = [torch.ops.d2seg.sample_points(*args)]
    got += list(torch.ops.d2seg.sample_points_backward(dev(go), *args, False))[:1]
    _check_device_and_dtype(got, [dtype, dtype], "sample_points (boxes)")
    for name, a, c, e in zip(names, got, cpu, expected):
        close(a, c, dtype, n, f"op (boxes) {name} vs the CPU kernel")
        close(a, e, dtype, n, f"op (boxes) {name} vs the composite")

    f = dev(feats).requires_grad_()
    out = pf.point_sample_boxes([f], dev(boxes), dev(bi), dev(pts), [scale])
    got = [out] + _grads(out, [f], dev(go))
    _check_device_and_dtype(got, [dtype, dtype], "d2seg.layers.point_sample_boxes")
    for name, a, e in zip(names, got, expected):
        close(a, e, dtype, n, f"d2seg.layers.point_sample_boxes {name} vs the composite")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
def test_point_sample_boxes_two_levels(pair):
    """The wrapper over two levels (one op per level, channels concatenated)."""
    dtype, cdt = pair
    g = gen("sp_levels")
    feats = [randn(g, 3, 4, 16, 20).to(dtype), randn(g, 3, 2, 8, 10).to(dtype)]
    boxes, bi = _boxes(g, 3, 16, 20, 9, 1 / 4)
    boxes, pts = boxes.to(cdt), _box_points(g, 9, 13).to(cdt)
    go = randn(g, 9, 6, 13).to(dtype)
    inputs = [f.double().requires_grad_() for f in feats]
    ref = pf.point_sample_boxes_reference(inputs, boxes.double(), bi, pts.double(), [1 / 4, 1 / 8])
    expected = [ref.detach()] + _grads(ref, inputs, go.double())
    inputs = [dev(f).requires_grad_() for f in feats]
    out = pf.point_sample_boxes(inputs, dev(boxes), dev(bi), dev(pts), [1 / 4, 1 / 8])
    got = [out] + _grads(out, inputs, dev(go))
    _check_device_and_dtype(got, [dtype] * 3, "d2seg.layers.point_sample_boxes")
    for name, a, e in zip(["output", "p2 grad", "p3 grad"], got, expected):
        close(a, e, dtype, 4 * 9 * 13, f"d2seg.layers.point_sample_boxes (2 levels) {name} vs the composite")


# ------------------------------------------ gradcheck -------------------------------------

# The CUDA backward kernels add with atomics, so two identical backward passes may differ in
# the last bits of float64; gradcheck's reentrancy check would demand bit equality.
NONDET_TOL = 1e-10


@pytest.mark.parametrize("d", [1, 3, 5, 7])
def test_instance_aware_conv_gradcheck(d):
    g = gen("gc_iac", d)
    x = randn(g, 2, 3, 4, 5).to(DEVICE).requires_grad_()
    w = randn(g, 2, 4, 3, d, d).to(DEVICE).requires_grad_()
    b = randn(g, 2, 4).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(dc.instance_aware_conv, (x, w, b), nondet_tol=NONDET_TOL)


@pytest.mark.parametrize("rel", ["none", "rel_scales"])
@pytest.mark.parametrize("channels", [8, 5])
@pytest.mark.parametrize("num_layers", [1, 3, 8])
def test_dynamic_mask_head_gradcheck(num_layers, channels, rel):
    g = gen("gc_dmh", num_layers, channels, rel)
    N, C, H, W, R = 2, 3, 3, 5, 3
    feats = randn(g, N, C, H, W).to(DEVICE).requires_grad_()
    inds = torch.randint(0, N, (R,), generator=g).to(DEVICE)
    P = dc.dynamic_mask_head_num_params(C + (0 if rel == "none" else 2), channels, num_layers)
    params = (randn(g, R, P) * 0.5).to(DEVICE).requires_grad_()
    locs = (torch.rand(R, 2, generator=g, dtype=f64) * 40).to(DEVICE) if rel != "none" else None
    scales = (torch.rand(R, generator=g, dtype=f64) * 64 + 16).to(DEVICE) if rel != "none" else None

    def fn(f, p):
        return dc.dynamic_mask_head(f, inds, p, channels=channels, num_layers=num_layers,
                                    instance_locations=locs, mask_feat_stride=8, scales=scales)

    assert torch.autograd.gradcheck(fn, (feats, params), nondet_tol=NONDET_TOL)


def test_point_sample_gradcheck():
    # random (not dyadic) points: finite differences need points away from pixel borders
    g = gen("gc_sp")
    x = randn(g, 2, 3, 4, 5).to(DEVICE).requires_grad_()
    pts = (torch.rand(2, 9, 2, generator=g, dtype=f64) * 1.2 - 0.1).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(pf.point_sample, (x, pts), nondet_tol=NONDET_TOL)


def test_point_sample_boxes_gradcheck():
    g = gen("gc_boxes")
    feats = [randn(g, 2, 2, 4, 5).to(DEVICE).requires_grad_(), randn(g, 2, 1, 2, 3).to(DEVICE).requires_grad_()]
    boxes = torch.tensor([[1.0, 2.0, 12.0, 9.0], [-3.0, 0.0, 19.0, 17.0], [4.0, 4.0, 5.0, 6.0]], dtype=f64).to(DEVICE)
    bi = torch.tensor([1, 0, 1]).to(DEVICE)
    pts = torch.rand(3, 5, 2, generator=g, dtype=f64).to(DEVICE)

    def fn(a, b):
        return pf.point_sample_boxes([a, b], boxes, bi, pts, [1 / 4, 1 / 8])

    assert torch.autograd.gradcheck(fn, tuple(feats), nondet_tol=NONDET_TOL)


# ------------------------------- non-contiguous inputs, dispatch --------------------------


def test_non_contiguous_inputs_match_the_cpu_kernel():
    g = gen("noncontig")
    # instance_aware_conv: permuted templates, transposed bias
    x = randn(g, 16, 16, 9, 16).float().permute(0, 2, 1, 3)
    w = (randn(g, 16, 64, 9, 3, 3) * 0.3).float()
    b = randn(g, 64, 16).float().t()
    close(torch.ops.d2seg.instance_aware_conv(dev(x), dev(w), dev(b)),
          torch.ops.d2seg.instance_aware_conv(x, w, b), f32, 82, "instance_aware_conv, non-contiguous")
    # dynamic_mask_head: channels-last features
    feats = randn(g, 2, 10, 12, 8).float().permute(0, 3, 1, 2)
    inds = torch.randint(0, 2, (6,), generator=g)
    params = (randn(g, 6, 169) * 0.3).float()
    locs = torch.rand(6, 2, generator=g) * 90
    scales = torch.full((6,), 64.0)
    args = (feats, inds, params, locs, scales, 8, 3, 8)
    close(torch.ops.d2seg.dynamic_mask_head(*[dev(a) if torch.is_tensor(a) else a for a in args]),
          torch.ops.d2seg.dynamic_mask_head(*args), f32, 30, "dynamic_mask_head, non-contiguous")
    # sample_points: channels-last features, points with a stride
    f = randn(g, 2, 9, 11, 6).float().permute(0, 3, 1, 2)
    pts = _image_points(g, 2, 40).float()[:, ::2]
    close(torch.ops.d2seg.sample_points(dev(f), dev(pts), None, None, 1.0),
          torch.ops.d2seg.sample_points(f, pts, None, None, 1.0), f32, 4, "sample_points, non-contiguous")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_wrappers_run_the_compiled_ops(dtype):
    """In every dtype the wrappers call the d2seg op (forward and backward) on the device,
    not the composite."""
    g = gen("dispatch")
    x = dev(randn(g, 2, 3, 5, 5).to(dtype)).requires_grad_()
    w = dev(randn(g, 2, 4, 3, 3, 3).to(dtype)).requires_grad_()
    feats = dev(randn(g, 2, 8, 5, 6).to(dtype)).requires_grad_()
    params = dev((randn(g, 3, 169) * 0.3).to(dtype)).requires_grad_()
    inds, locs = dev(torch.tensor([0, 1, 1])), dev(torch.rand(3, 2, generator=g).to(compute_dtype(dtype)))
    pts = dev(_image_points(g, 2, 7).to(dtype)).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss = dc.instance_aware_conv(x, w).float().sum()
        loss = loss + dc.dynamic_mask_head(feats, inds, params, instance_locations=locs).float().sum()
        loss = loss + pf.point_sample(feats, pts).float().sum()
        loss.backward()
    names = {e.key for e in prof.key_averages()}
    for op in ("instance_aware_conv", "dynamic_mask_head", "sample_points"):
        assert f"d2seg::{op}" in names, f"{op}: the wrapper did not call the compiled op for {dtype}"
        assert f"d2seg::{op}_backward" in names, f"{op}: no compiled backward for {dtype}"


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_wrappers_keep_float32_coordinates(dtype):
    """Beside float16 / bfloat16 data, the wrappers pass float32 locations, scales, point
    coordinates and boxes to the op as they are (a pixel position of a few hundred in
    bfloat16 is off by whole pixels): the wrapper gives exactly the op's result on the
    float32 values."""
    g = gen("keep_f32")
    feats = dev(randn(g, 2, 8, 20, 30).to(dtype))
    inds = dev(torch.tensor([0, 1, 1, 0]))
    params = dev((randn(g, 4, 169) * 0.5).to(dtype))
    locs = dev(torch.rand(4, 2, generator=g) * torch.tensor([240.0, 160.0]) + 0.3)
    scales = dev(torch.full((4,), 64.0))
    out = dc.dynamic_mask_head(feats, inds, params, instance_locations=locs, mask_feat_stride=8, scales=scales)
    op = torch.ops.d2seg.dynamic_mask_head(feats, inds, params, locs, scales, 8, 3, 8)
    torch.testing.assert_close(out, op, rtol=0, atol=0, msg=lambda m: f"dynamic_mask_head: {m}")

    f = dev(randn(g, 2, 4, 50, 68).to(dtype))
    pts = dev(torch.rand(2, 300, 2, generator=g))
    out = pf.point_sample(f, pts)
    op = torch.ops.d2seg.sample_points(f, pts, None, None, 1.0)
    torch.testing.assert_close(out, op, rtol=0, atol=0, msg=lambda m: f"point_sample: {m}")

    boxes, bi = _boxes(g, 2, 50, 68, 6, 1 / 4)
    boxes, bi, bpts = dev(boxes.float()), dev(bi), dev(torch.rand(6, 20, 2, generator=g))
    out = pf.point_sample_boxes([f], boxes, bi, bpts, [1 / 4])
    op = torch.ops.d2seg.sample_points(f, bpts, boxes, bi, 0.25)
    torch.testing.assert_close(out, op, rtol=0, atol=0, msg=lambda m: f"point_sample_boxes: {m}")
