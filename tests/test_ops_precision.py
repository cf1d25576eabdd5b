"""float16 / bfloat16 in the compiled ops, and their autocast policy (CPU).

Every compiled op computes half-precision inputs in float32 and rounds its result to the
input's dtype. So on half-precision inputs it must return exactly the float32 kernel's
result on the same (upcast, hence identical) values, rounded once: these tests demand
bit equality with that, and compare the float32 kernel with the independent PyTorch
composite in float64 for the values that matter. Under torch.autocast each op must run its
compiled kernel (seen in the profiler, no composite op, no logged fallback) with the
dtypes of its policy (csrc/autocast.cpp)."""
import logging

import pytest
import torch
import torch.nn.functional as F

from d2seg.layers import dynamic_conv as dc
from d2seg.layers import extension
from d2seg.layers import point_features as pf
from d2seg.layers.extension import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="d2seg._C not built")

HALF = [torch.float16, torch.bfloat16]
ops = torch.ops.d2seg


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _q(t, dt):
    """t rounded to dt: the exact inputs of both the half and the float32 runs."""
    return None if t is None else t.to(dt)


def _assert_rounded_from(out, ref32, dt, exact=True):
    """out is ref32 rounded to dt; with exact=False, within one unit in the last place of
    dt (the float32 sums of two builds of a loop may differ in their last bit, by FMA
    contraction, and then round to the neighbouring half value)."""
    assert out.dtype == dt
    if exact:
        assert torch.equal(out, ref32.to(dt)), (out.float() - ref32).abs().max()
    else:
        ulp = torch.finfo(dt).eps * ref32.abs() + torch.finfo(dt).tiny
        assert ((out.float() - ref32).abs() <= ulp).all(), ((out.float() - ref32).abs() / ulp).max()


# ------------------------------------ instance_aware_conv ---------------------------------


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("d,shape", [(1, (3, 9, 16, 16, 32)), (3, (3, 9, 16, 16, 32)), (3, (2, 4, 5, 7, 3)),
                                     (5, (2, 3, 9, 11, 4)), (7, (1, 2, 8, 8, 2))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_instance_aware_conv_half_is_the_float32_kernel_rounded(dt, d, shape, with_bias):
    R, E, H, W, B = shape
    x = _q(_rand(R, E, H, W, seed=1), dt)
    w = _q(_rand(R, B, E, d, d, seed=2, scale=0.3), dt)
    b = _q(_rand(R, B, seed=3), dt) if with_bias else None
    out = ops.instance_aware_conv(x, w, b)
    ref32 = ops.instance_aware_conv(x.float(), w.float(), None if b is None else b.float())
    _assert_rounded_from(out, ref32, dt)
    # and the float32 kernel is the composite, computed independently in float64
    ref64 = dc.instance_aware_conv_reference(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(ref32.double(), ref64, atol=1e-4, rtol=1e-4)
    go = _q(_rand(*out.shape, seed=4), dt)
    grads = ops.instance_aware_conv_backward(go, x, w)
    grads32 = ops.instance_aware_conv_backward(go.float(), x.float(), w.float())
    for g, g32 in zip(grads, grads32):
        _assert_rounded_from(g, g32, dt)


@pytest.mark.parametrize("dt", HALF)
def test_instance_aware_conv_half_empty(dt):
    x = torch.zeros(0, 9, 8, 8, dtype=dt)
    w = torch.zeros(0, 16, 9, 1, 1, dtype=dt)
    assert ops.instance_aware_conv(x, w, None).shape == (0, 16, 8, 8)
    assert ops.instance_aware_conv(x, w, None).dtype == dt


def test_instance_aware_conv_mixed_dtypes_outside_autocast_is_an_error():
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    w = torch.randn(2, 4, 3, 1, 1)
    with pytest.raises(ValueError, match="same dtype"):
        dc.instance_aware_conv(x, w)
    with pytest.raises(RuntimeError, match="same floating dtype"):
        ops.instance_aware_conv(x, w, None)


# ------------------------------------- dynamic_mask_head ----------------------------------


def _head(N=2, C=8, H=9, W=13, R=6, channels=8, num_layers=3, rel=True, seed=0):
    feats = _rand(N, C, H, W, seed=seed)
    in_ch = C + (2 if rel else 0)
    params = _rand(R, dc.dynamic_mask_head_num_params(in_ch, channels, num_layers), seed=seed + 1, scale=0.3)
    inds = torch.arange(R) % N
    locs = torch.rand(R, 2, generator=torch.Generator().manual_seed(seed + 2)) * torch.tensor([W * 8.0, H * 8.0])
    scales = torch.tensor([64.0, 128.0, 256.0])[torch.arange(R) % 3]
    return feats, inds, params, (locs if rel else None), (scales if rel else None)


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("channels,num_layers,rel", [(8, 3, True), (8, 1, False), (5, 4, True), (8, 8, False)])
def test_dynamic_mask_head_half_is_the_float32_kernel_rounded(dt, channels, num_layers, rel):
    feats, inds, params, locs, scales = _head(channels=channels, num_layers=num_layers, rel=rel)
    f, p = _q(feats, dt), _q(params, dt)
    # pixel positions stay float32 beside half features
    out = ops.dynamic_mask_head(f, inds, p, locs, scales, channels, num_layers, 8)
    ref32 = ops.dynamic_mask_head(f.float(), inds, p.float(), locs, scales, channels, num_layers, 8)
    _assert_rounded_from(out, ref32, dt)
    ref64 = dc.dynamic_mask_head_reference(f.double(), inds, p.double(), channels, num_layers,
                                           None if locs is None else locs.double(), 8,
                                           None if scales is None else scales.double())
    torch.testing.assert_close(ref32.double(), ref64, atol=1e-4, rtol=1e-4)
    go = _q(_rand(*out.shape, seed=9), dt)
    gf, gp = ops.dynamic_mask_head_backward(go, f, inds, p, locs, scales, channels, num_layers, 8)
    gf32, gp32 = ops.dynamic_mask_head_backward(go.float(), f.float(), inds, p.float(), locs, scales,
                                                channels, num_layers, 8)
    _assert_rounded_from(gf, gf32, dt)
    _assert_rounded_from(gp, gp32, dt)


def test_dynamic_mask_head_float64_locations_beside_float32_features_is_an_error():
    feats, inds, params, locs, scales = _head()
    with pytest.raises(RuntimeError, match="instance_locations must have the dtype"):
        ops.dynamic_mask_head(feats, inds, params, locs.double(), scales, 8, 3, 8)


# --------------------------------------- point sampling -----------------------------------


@pytest.mark.parametrize("dt", HALF)
@pytest.mark.parametrize("coords_dt", ["float32", "same"])
def test_point_sample_half_features_is_the_float32_kernel_rounded(dt, coords_dt):
    f = _q(_rand(2, 7, 11, 13, seed=5), dt)
    pts = torch.rand(2, 300, 2, generator=torch.Generator().manual_seed(6)) * 1.2 - 0.1
    pts = pts if coords_dt == "float32" else pts.to(dt)
    out = ops.sample_points(f, pts, None, None, 1.0)
    ref32 = ops.sample_points(f.float(), pts.float(), None, None, 1.0)
    _assert_rounded_from(out, ref32, dt, exact=False)
    go = _q(_rand(*out.shape, seed=7), dt)
    gf, gc = ops.sample_points_backward(go, f, pts, None, None, 1.0, True)
    gf32, gc32 = ops.sample_points_backward(go.float(), f.float(), pts.float(), None, None, 1.0, True)
    _assert_rounded_from(gf, gf32, dt, exact=False)
    assert gc.dtype == pts.dtype  # the coordinate gradient has the coordinates' dtype
    _assert_rounded_from(gc, gc32, pts.dtype, exact=False)


@pytest.mark.parametrize("dt", HALF)
def test_point_sample_boxes_half_features(dt):
    g = torch.Generator().manual_seed(8)
    feats = [_q(_rand(2, 4, 16, 20, seed=9), dt), _q(_rand(2, 3, 8, 10, seed=10), dt)]
    xy = torch.rand(30, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(30, 2, generator=g) * 20 + 1], 1)
    bi = torch.arange(30) % 2
    pts = torch.rand(30, 49, 2, generator=g)
    out = pf.point_sample_boxes(feats, boxes, bi, pts, [1 / 4, 1 / 8])
    ref32 = pf.point_sample_boxes([f.float() for f in feats], boxes, bi, pts, [1 / 4, 1 / 8])
    _assert_rounded_from(out, ref32, dt, exact=False)
    ref64 = pf.point_sample_boxes_reference([f.double() for f in feats], boxes.double(), bi, pts.double(), [1 / 4, 1 / 8])
    torch.testing.assert_close(ref32.double(), ref64, atol=1e-5, rtol=1e-5)


def test_point_sample_bfloat16_coords_would_be_far_off():
    """Why the points stay float32: rounding them to bfloat16 moves samples by whole pixels
    on a 512-px map, so the wrapper does not do it."""
    f = _rand(1, 1, 512, 512, seed=11)
    pts = torch.rand(1, 1000, 2, generator=torch.Generator().manual_seed(12))
    exact = pf.point_sample(f, pts)
    err_half_features = (pf.point_sample(f.bfloat16(), pts).float() - exact).abs().max()
    err_half_points = (pf.point_sample(f, pts.bfloat16().float()) - exact).abs().max()
    assert err_half_features < 0.05  # |f| < 5: 4 corners of relative error 2^-8, rounded
    assert err_half_points > 0.5


# ----------------------------------------- autocast ----------------------------------------


def _op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _run_under_autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def test_autocast_instance_aware_conv_runs_the_kernel_in_bfloat16():
    x = _rand(3, 9, 16, 16, seed=13).requires_grad_()
    w = _rand(3, 32, 9, 1, 1, seed=14, scale=0.3).requires_grad_()
    b = _rand(3, 32, seed=15).requires_grad_()
    names = _op_names(lambda: _run_under_autocast(lambda: dc.instance_aware_conv(x, w, b)))
    assert "d2seg::instance_aware_conv" in names and "aten::conv2d" not in names
    out = _run_under_autocast(lambda: dc.instance_aware_conv(x, w, b))
    assert out.dtype == torch.bfloat16
    ref32 = ops.instance_aware_conv(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float())
    assert torch.equal(out, ref32.bfloat16())
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_autocast_dynamic_mask_head_keeps_locations_in_float32():
    feats, inds, params, locs, scales = _head(H=20, W=24)
    feats.requires_grad_()
    params.requires_grad_()
    fn = lambda: dc.dynamic_mask_head(feats, inds, params, instance_locations=locs, scales=scales)  # noqa: E731
    names = _op_names(lambda: _run_under_autocast(fn))
    assert "d2seg::dynamic_mask_head" in names and "aten::conv2d" not in names
    out = _run_under_autocast(fn)
    assert out.dtype == torch.bfloat16
    # exactly: bfloat16 features and parameters, float32 relative coordinates
    ref32 = ops.dynamic_mask_head(feats.bfloat16().float(), inds, params.bfloat16().float(), locs, scales, 8, 3, 8)
    assert torch.equal(out, ref32.bfloat16())
    out.float().sum().backward()
    assert feats.grad.dtype == torch.float32 and params.grad.dtype == torch.float32
    assert torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0


def test_autocast_point_sample_keeps_feature_dtype_and_float32_points():
    f32 = _rand(2, 6, 40, 50, seed=16).requires_grad_()
    pts = torch.rand(2, 500, 2, generator=torch.Generator().manual_seed(17))
    # float32 features stay float32 (nothing to gain from rounding them for an interpolation)
    names = _op_names(lambda: _run_under_autocast(lambda: pf.point_sample(f32, pts)))
    assert "d2seg::sample_points" in names and "aten::grid_sampler_2d" not in names
    out = _run_under_autocast(lambda: pf.point_sample(f32, pts.bfloat16()))
    assert out.dtype == torch.float32
    _assert_rounded_from(out, pf.point_sample(f32, pts.bfloat16().float()), torch.float32, exact=False)
    # bfloat16 features (a bfloat16 conv's output) stay bfloat16; the points are float32
    fb = f32.detach().bfloat16().requires_grad_()
    out = _run_under_autocast(lambda: pf.point_sample(fb, pts))
    _assert_rounded_from(out, pf.point_sample(fb.float(), pts), torch.bfloat16, exact=False)
    out.float().sum().backward()
    assert fb.grad.dtype == torch.bfloat16 and fb.grad.abs().sum() > 0
    # the box form, a level of each dtype
    boxes = torch.tensor([[2.0, 3.0, 40.0, 30.0], [10.0, 1.0, 90.0, 70.0]])
    bpts = torch.rand(2, 49, 2, generator=torch.Generator().manual_seed(18))
    names = _op_names(lambda: _run_under_autocast(
        lambda: pf.point_sample_boxes([fb, f32], boxes.bfloat16(), torch.tensor([0, 1]), bpts.bfloat16(), [1 / 2, 1 / 2])
    ))
    assert "d2seg::sample_points" in names and "aten::grid_sampler_2d" not in names
    assert extension.fallbacks() == [] or all(op not in ("point_sample", "point_sample_boxes") or "options" in why
                                              for op, why in extension.fallbacks())


def test_fallback_is_logged_once_with_its_reason(caplog, monkeypatch):
    # Another test may already have logged this (op, reason) in this process: start afresh.
    monkeypatch.setattr(extension, "_FALLBACKS", set())
    x = torch.randn(1, 2, 5, 5)
    pts = torch.rand(1, 4, 2)
    with caplog.at_level(logging.WARNING, logger="d2seg.layers.extension"):
        pf.point_sample(x, pts, align_corners=True)
        pf.point_sample(x, pts, align_corners=True)
    msgs = [r.getMessage() for r in caplog.records if "point_sample" in r.getMessage()]
    assert len(msgs) == 1 and "align_corners" in msgs[0] and "reference" in msgs[0]
    assert any(op == "point_sample" and "align_corners" in why for op, why in extension.fallbacks())


def test_half_precision_fallback_on_cpu_samples_in_float32(monkeypatch):
    """The pure-PyTorch fallback of point sampling does not run F.grid_sample in half
    precision on CPU (its backward can segfault in PyTorch 2.14): float32 inside, the
    input's dtype out, gradients to the half-precision leaf."""
    monkeypatch.setattr(extension, "_FALLBACKS", set())
    x = torch.randn(1, 3, 6, 7).bfloat16().requires_grad_()
    pts = torch.rand(1, 5, 2)
    seen = []
    real = F.grid_sample

    def spy(inp, *a, **k):
        seen.append(inp.dtype)
        return real(inp, *a, **k)

    monkeypatch.setattr(pf.F, "grid_sample", spy)
    out = pf.point_sample(x, pts, align_corners=True)  # an option the compiled op lacks
    assert out.dtype == torch.bfloat16 and seen == [torch.float32]
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
    expected = F.grid_sample(x.detach().float(), 2 * pts.unsqueeze(2) - 1, align_corners=True).squeeze(3)
    torch.testing.assert_close(out.float(), expected.bfloat16().float())
