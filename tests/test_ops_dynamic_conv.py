"""Compiled dynamic convolutions (d2seg.layers.dynamic_conv) against their pure-PyTorch
references: values, gradients (gradcheck in float64), odd shapes, empty inputs,
non-contiguous inputs, errors, and torch.compile."""
import sys

import pytest
import torch

from d2seg.layers import dynamic_conv as dc
from conftest import assert_compiled_matches_eager
from d2seg.layers.extension import extension_available, load_extension

pytestmark = pytest.mark.skipif(not extension_available(), reason="d2seg._C not built")
_C = load_extension()

f64 = torch.float64


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


# ------------------------------------ instance_aware_conv ---------------------------------


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("shape", [(3, 9, 16, 16, 20), (2, 4, 5, 7, 3), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_instance_aware_conv_matches_grouped_conv(d, shape, with_bias):
    R, E, H, W, B = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(R, E, H, W, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(R, B, E, d, d, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(R, B, dtype=f64, generator=g, requires_grad=True) if with_bias else None
    out = dc.instance_aware_conv(x, w, b)
    ref = dc.instance_aware_conv_reference(x, w, b)
    assert out.shape == (R, B, H, W)
    torch.testing.assert_close(out, ref)
    inputs = [x, w] + ([b] if with_bias else [])
    for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("d", [1, 3])
def test_instance_aware_conv_gradcheck(d):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(2, 4, 3, d, d, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(2, 4, dtype=f64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(dc.instance_aware_conv, (x, w, b))


@pytest.mark.parametrize("d", [1, 3])
def test_instance_aware_conv_float32_pointins_size_and_noncontiguous(d):
    g = torch.Generator().manual_seed(3)
    # PointINS: E=9 templates of 16x16, B=256 (fewer instances to keep the test short)
    x = torch.randn(16, 16, 9, 16, generator=g).permute(0, 2, 1, 3).requires_grad_()  # non-contiguous
    w = (torch.randn(16, 256, 9, d, d, generator=g) * 0.3).requires_grad_()
    b = torch.randn(256, 16, generator=g).t().requires_grad_()  # non-contiguous
    assert not x.is_contiguous() and not b.is_contiguous()
    out, ref = dc.instance_aware_conv(x, w, b), dc.instance_aware_conv_reference(x, w, b)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, r in zip(_grads(out, [x, w, b]), _grads(ref, [x, w, b])):
        torch.testing.assert_close(a, r, atol=2e-3, rtol=1e-4)


# The CPU op has three kernels: direct loops for d = 1 and for tiny instances (the shared
# per-element math that CUDA also runs); Winograd's F(2x2, 3x3) for d = 3 from 2**14
# multiply-adds per instance on; batched GEMMs over chunks of instances (im2col with the
# bias folded in; col2im in the backward) for d = 5, 7 from the same size on.
# d2seg._C.instance_aware_conv_cpu_kernel says which one a shape takes
# (test_instance_aware_conv_kernel_choice); the small shapes above are direct except
# (3, 9, 16, 16, 20) with d = 3 (Winograd).


def _check_against_reference(x, w, b, **tol):
    out, ref = dc.instance_aware_conv(x, w, b), dc.instance_aware_conv_reference(x, w, b)
    torch.testing.assert_close(out, ref, **tol)
    inputs = [x, w] + ([b] if b is not None else [])
    for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize(
    "shape",
    [
        (3, 9, 16, 16, 256),  # PointINS: whole packs of tiles, 16 blocks of 16 outputs
        (2, 3, 7, 5, 64),  # odd height and width: the last tile row / column is half outside
        (2, 4, 19, 37, 40),  # 19 tiles per row: a partial pack; 40 outputs: a partial block
        (1, 5, 33, 2, 300),  # one tile per row
        (2, 2, 1, 1, 4096),  # a single pixel: every tap but the centre is padding
        (2, 1, 2, 40, 250),  # one input channel, one tile row
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_instance_aware_conv_winograd_path(shape, with_bias):
    R, E, H, W, B = shape
    assert _C.instance_aware_conv_cpu_kernel(B, E, 3, H, W, 8) == "winograd"
    g = torch.Generator().manual_seed(15)
    x = torch.randn(R, E, H, W, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(R, B, E, 3, 3, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(R, B, dtype=f64, generator=g, requires_grad=True) if with_bias else None
    _check_against_reference(x, w, b)


def test_instance_aware_conv_winograd_float32_error_is_small():
    # the transforms only add, subtract and halve: float32 stays close to the float64 result
    g = torch.Generator().manual_seed(16)
    x = torch.randn(8, 9, 16, 16, dtype=f64, generator=g)
    w = torch.randn(8, 256, 9, 3, 3, dtype=f64, generator=g) * 0.3
    exact = dc.instance_aware_conv_reference(x, w)
    out = dc.instance_aware_conv(x.float(), w.float())
    direct = dc.instance_aware_conv_reference(x.float(), w.float())
    err, err_direct = (out.double() - exact).abs().max(), (direct.double() - exact).abs().max()
    assert err < 4 * err_direct + 1e-6, (err, err_direct)


@pytest.mark.parametrize("d", [5, 7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_instance_aware_conv_gemm_path(d, with_bias):
    R, E, H, W, B = 3, 2, 19, 23, 64
    g = torch.Generator().manual_seed(11)
    x = torch.randn(R, E, H, W, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(R, B, E, d, d, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(R, B, dtype=f64, generator=g, requires_grad=True) if with_bias else None
    out, ref = dc.instance_aware_conv(x, w, b), dc.instance_aware_conv_reference(x, w, b)
    torch.testing.assert_close(out, ref)
    inputs = [x, w] + ([b] if with_bias else [])
    for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, r)


def test_instance_aware_conv_gemm_path_several_chunks():
    # a chunk's scratch is capped at 32 MiB: here (98 + 1) taps x (128^2 pixels + 16 outputs)
    # x 8 bytes = 13 MiB per instance, so R = 3 runs a chunk of 2 and a chunk of 1
    R, E, H, W, B, d = 3, 2, 128, 128, 16, 7
    g = torch.Generator().manual_seed(14)
    x = torch.randn(R, E, H, W, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(R, B, E, d, d, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(R, B, dtype=f64, generator=g, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            out = dc.instance_aware_conv(x, w, b)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::bmm") == 2
    out = dc.instance_aware_conv(x, w, b)
    ref = dc.instance_aware_conv_reference(x, w, b)
    torch.testing.assert_close(out, ref)
    for a, r in zip(_grads(out, [x, w, b]), _grads(ref, [x, w, b])):
        torch.testing.assert_close(a, r)


def test_instance_aware_conv_3x3_on_a_large_image_takes_the_gemm_path():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 1, 256, 256, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(2, 1, 1, 3, 3, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(2, 1, dtype=f64, generator=g, requires_grad=True)
    assert _C.instance_aware_conv_cpu_kernel(1, 1, 3, 256, 256, 8) == "gemm"
    _check_against_reference(x, w, b)


@pytest.mark.parametrize("d", [5, 7])
def test_instance_aware_conv_gemm_path_kernel_larger_than_image(d):
    # taps entirely outside the 2 x 3 image: im2col / col2im must zero / skip them
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 2, 3, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(2, 64, 3, d, d, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(2, 64, dtype=f64, generator=g, requires_grad=True)
    out, ref = dc.instance_aware_conv(x, w, b), dc.instance_aware_conv_reference(x, w, b)
    torch.testing.assert_close(out, ref)
    for a, r in zip(_grads(out, [x, w, b]), _grads(ref, [x, w, b])):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize(
    "d, B, kernel",
    [
        (3, 32, "winograd"),  # 32 outputs x 18 taps x 30 pixels = 17280 multiply-adds per instance
        (5, 16, "gemm"),  # 16 outputs x 50 taps x 30 pixels = 24000
    ],
)
def test_instance_aware_conv_fast_kernels_gradcheck(d, B, kernel):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 2, 6, 5, dtype=f64, generator=g, requires_grad=True)
    w = torch.randn(2, B, 2, d, d, dtype=f64, generator=g, requires_grad=True)
    b = torch.randn(2, B, dtype=f64, generator=g, requires_grad=True)
    assert _C.instance_aware_conv_cpu_kernel(B, 2, d, 6, 5, 8) == kernel
    assert torch.autograd.gradcheck(dc.instance_aware_conv, (x, w, b))


@pytest.mark.parametrize(
    "shape, d, kernel",
    [
        ((4, 9, 16, 16, 256), 3, "winograd"),
        ((4, 9, 16, 16, 256), 5, "gemm"),
        ((4, 9, 16, 16, 256), 1, "direct"),
        ((2, 4, 5, 7, 3), 3, "direct"),
        # 3x3 on a 256 x 256 image: Winograd's per-thread scratch would exceed 16 MiB
        ((2, 1, 256, 256, 1), 3, "gemm"),
    ],
)
def test_instance_aware_conv_kernel_choice(shape, d, kernel):
    """Which CPU kernel runs; in the profile, the GEMM path (only) calls aten::bmm."""
    R, E, H, W, B = shape
    assert _C.instance_aware_conv_cpu_kernel(B, E, d, H, W) == kernel
    x = torch.randn(R, E, H, W, requires_grad=True)
    w = torch.randn(R, B, E, d, d, requires_grad=True)
    b = torch.randn(R, B, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dc.instance_aware_conv(x, w, b).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "d2seg::instance_aware_conv" in names and "d2seg::instance_aware_conv_backward" in names
    assert ("aten::bmm" in names) == (kernel == "gemm")


@pytest.mark.skipif(sys.platform == "darwin", reason="Apple clang builds without OpenMP")
def test_extension_is_built_with_openmp():
    # without OpenMP, at::parallel_for in the extension runs every CPU kernel on one thread
    assert _C.has_openmp()


@pytest.mark.parametrize("d", [1, 3])
def test_instance_aware_conv_empty(d):
    x = torch.zeros(0, 9, 16, 16, requires_grad=True)
    w = torch.zeros(0, 256, 9, d, d, requires_grad=True)
    out = dc.instance_aware_conv(x, w, torch.zeros(0, 256))
    assert out.shape == (0, 256, 16, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_instance_aware_conv_errors():
    x = torch.randn(2, 9, 8, 8)
    with pytest.raises(ValueError, match="R and E must agree"):
        dc.instance_aware_conv(x, torch.randn(3, 4, 9, 1, 1))
    with pytest.raises(ValueError, match="odd size"):
        dc.instance_aware_conv(x, torch.randn(2, 4, 9, 2, 2))
    with pytest.raises(ValueError, match="bias must be"):
        dc.instance_aware_conv(x, torch.randn(2, 4, 9, 1, 1), torch.randn(2, 5))
    with pytest.raises(ValueError, match="same device"):
        dc.instance_aware_conv(x, torch.randn(2, 4, 9, 1, 1, device="meta"))
    # the op itself raises a RuntimeError with a message, not a crash
    with pytest.raises(RuntimeError, match="does not match input"):
        torch.ops.d2seg.instance_aware_conv(x, torch.randn(3, 4, 9, 1, 1), None)
    with pytest.raises(RuntimeError, match="same floating dtype"):
        torch.ops.d2seg.instance_aware_conv(x, torch.randn(2, 4, 9, 1, 1, dtype=f64), None)


# ------------------------------------- dynamic_mask_head ----------------------------------


def _head_inputs(N=2, C=8, H=7, W=13, R=5, channels=8, num_layers=3, rel=True, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(N, C, H, W, dtype=dtype, generator=g, requires_grad=True)
    inds = torch.randint(0, N, (R,), generator=g)
    P = dc.dynamic_mask_head_num_params(C + (2 if rel else 0), channels, num_layers)
    params = (torch.randn(R, P, dtype=dtype, generator=g) * 0.5).requires_grad_()
    locs = torch.rand(R, 2, dtype=dtype, generator=g) * 8 * max(H, W) if rel else None
    scales = torch.rand(R, dtype=dtype, generator=g) * 64 + 16 if rel else None
    return feats, inds, params, locs, scales


def test_condinst_default_has_169_params():
    assert dc.dynamic_mask_head_num_params(8 + 2, 8, 3) == 169


def test_dynamic_mask_head_follows_adelaidet_layout_by_hand():
    """One pixel computed by hand from the flat vector: weights (out, in) row-major of all
    layers first, then all biases; relative coordinates (x, then y) first."""
    feats, inds, params, locs, scales = _head_inputs(R=1, H=3, W=4)
    out = dc.dynamic_mask_head(feats, inds, params, instance_locations=locs, scales=scales, mask_feat_stride=8)
    p = params[0].detach()
    y, x = 2, 1
    n = int(inds[0])
    rel = torch.stack([(locs[0, 0] - (x * 8 + 4)) / scales[0], (locs[0, 1] - (y * 8 + 4)) / scales[0]])
    v = torch.cat([rel, feats[n, :, y, x].detach()])
    w1, w2, w3 = p[:80].view(8, 10), p[80:144].view(8, 8), p[144:152].view(1, 8)
    b1, b2, b3 = p[152:160], p[160:168], p[168:169]
    h = torch.relu(w1 @ v + b1)
    h = torch.relu(w2 @ h + b2)
    expected = (w3 @ h + b3)[0]
    torch.testing.assert_close(out[0, 0, y, x], expected)


@pytest.mark.parametrize(
    "C,H,W,channels,num_layers,rel",
    [(8, 7, 13, 8, 3, True), (8, 9, 16, 8, 3, False), (3, 5, 11, 5, 4, True), (16, 4, 9, 8, 1, False), (4, 1, 1, 3, 2, True)],
)
def test_dynamic_mask_head_matches_reference(C, H, W, channels, num_layers, rel):
    feats, inds, params, locs, scales = _head_inputs(C=C, H=H, W=W, channels=channels, num_layers=num_layers, rel=rel)
    kw = dict(channels=channels, num_layers=num_layers, instance_locations=locs, scales=scales, mask_feat_stride=4)
    out = dc.dynamic_mask_head(feats, inds, params, **kw)
    ref = dc.dynamic_mask_head_reference(feats, inds, params, **kw)
    assert out.shape == (params.shape[0], 1, H, W)
    torch.testing.assert_close(out, ref)
    for a, r in zip(_grads(out, [feats, params]), _grads(ref, [feats, params])):
        torch.testing.assert_close(a, r)


def test_dynamic_mask_head_gradcheck():
    feats, inds, params, locs, scales = _head_inputs(N=2, C=3, H=3, W=5, R=3)
    fn = lambda f, p: dc.dynamic_mask_head(f, inds, p, instance_locations=locs, scales=scales)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (feats, params))


def test_dynamic_mask_head_float32_condinst_size_noncontiguous():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 50, 68, 8, generator=g).permute(0, 3, 1, 2)  # (2, 8, 50, 68), non-contiguous
    inds = torch.randint(0, 2, (20,), generator=g)
    params = torch.randn(20, 169, generator=g) * 0.3
    locs = torch.rand(20, 2, generator=g) * 400
    scales = torch.tensor([64.0, 128.0]).repeat(10)
    kw = dict(instance_locations=locs, scales=scales)
    torch.testing.assert_close(
        dc.dynamic_mask_head(feats, inds, params, **kw), dc.dynamic_mask_head_reference(feats, inds, params, **kw), atol=1e-4, rtol=1e-4
    )


def test_dynamic_mask_head_empty_and_images_without_instances():
    feats, inds, params, locs, scales = _head_inputs(R=0)
    out = dc.dynamic_mask_head(feats, inds, params, instance_locations=locs, scales=scales)
    assert out.shape == (0, 1, 7, 13)
    out.sum().backward()
    assert feats.grad.abs().sum() == 0
    # all instances in image 1: image 0's feature gradient stays zero
    feats, _, params, locs, scales = _head_inputs(R=3)
    out = dc.dynamic_mask_head(feats, torch.ones(3, dtype=torch.int64), params, instance_locations=locs, scales=scales)
    out.sum().backward()
    assert feats.grad[0].abs().sum() == 0 and feats.grad[1].abs().sum() > 0


def test_dynamic_mask_head_errors():
    feats, inds, params, locs, scales = _head_inputs()
    with pytest.raises(ValueError, match="169 values per instance"):
        dc.dynamic_mask_head(feats, inds, params[:, :-1], instance_locations=locs)
    with pytest.raises(ValueError, match="im_inds must be"):
        dc.dynamic_mask_head(feats, inds[:-1], params, instance_locations=locs)
    with pytest.raises(ValueError, match="instance_locations must be"):
        dc.dynamic_mask_head(feats, inds, params, instance_locations=locs[:, :1])
    with pytest.raises(ValueError, match="same device"):
        dc.dynamic_mask_head(feats, inds, params.to("meta"), instance_locations=locs)
    with pytest.raises(RuntimeError, match=r"im_inds must be in \[0, N\)"):
        torch.ops.d2seg.dynamic_mask_head(feats, inds + 5, params, locs, scales, 8, 3, 8)
    with pytest.raises(RuntimeError, match="params must have 169"):
        torch.ops.d2seg.dynamic_mask_head(feats, inds, params[:, :5], locs, scales, 8, 3, 8)


def test_dynamic_kernel_product():
    g = torch.Generator().manual_seed(7)
    k = torch.randn(6, 32, dtype=f64, generator=g, requires_grad=True)
    f = torch.randn(3, 32, 5, 9, dtype=f64, generator=g, requires_grad=True)
    inds = torch.tensor([2, 0, 0, 1, 2, 2])
    out = dc.dynamic_kernel_product(k, f, inds)
    torch.testing.assert_close(out, torch.einsum("rc,rchw->rhw", k, f[inds]))
    # the same computation as the one-layer dynamic head with a zero bias
    params = torch.cat([k, torch.zeros(6, 1, dtype=f64)], dim=1)
    torch.testing.assert_close(out, dc.dynamic_mask_head(f, inds, params, num_layers=1)[:, 0])


# ---------------------------------------- torch.compile -----------------------------------


def test_ops_work_under_torch_compile():
    feats, inds, params, locs, scales = _head_inputs(dtype=torch.float32)
    x = torch.randn(2, 9, 6, 6, requires_grad=True)
    w = torch.randn(2, 5, 9, 3, 3, requires_grad=True)

    def fn(feats, params, x, w):
        m = dc.dynamic_mask_head(feats, inds, params, instance_locations=locs, scales=scales)
        return m.sigmoid().sum() + dc.instance_aware_conv(x, w).square().sum()

    args = (feats, params, x, w)
    assert_compiled_matches_eager(fn, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    feats, inds, params, locs, scales = _head_inputs(dtype=torch.float32)
    kw = dict(instance_locations=locs, scales=scales)
    out = dc.dynamic_mask_head(feats, inds, params, **kw)
    cuda = lambda t: t.detach().cuda().requires_grad_(t.requires_grad)  # noqa: E731
    fc, pc = cuda(feats), cuda(params)
    outc = dc.dynamic_mask_head(fc, inds.cuda(), pc, instance_locations=locs.cuda(), scales=scales.cuda())
    torch.testing.assert_close(outc.cpu(), out, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, [feats, params], g)
    gb = torch.autograd.grad(outc, [fc, pc], g.cuda())
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)
    x = torch.randn(3, 9, 16, 16)
    for d in (1, 3):
        w = torch.randn(3, 8, 9, d, d)
        torch.testing.assert_close(dc.instance_aware_conv(x.cuda(), w.cuda()).cpu(), dc.instance_aware_conv(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [1, 3])
def test_instance_aware_conv_without_input_channels(d):
    # E = 0: the output is the bias; its gradient is the output gradient summed over the pixels
    x = torch.zeros(3, 0, 6, 7, requires_grad=True)
    w = torch.zeros(3, 4, 0, d, d, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    out = dc.instance_aware_conv(x, w, b)
    torch.testing.assert_close(out, b[:, :, None, None].expand(3, 4, 6, 7).detach())
    go = torch.randn(3, 4, 6, 7)
    out.backward(go)
    torch.testing.assert_close(b.grad, go.sum((2, 3)))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
