"""Compiled point sampling (d2seg.layers.point_features) against F.grid_sample and
Detectron2's PointRend helpers: values, gradients, borders and outside points, empty
inputs, non-contiguous inputs, errors, torch.compile, and the uncertain point selection."""
import pytest
import torch
import torch.nn.functional as F

from d2seg.layers import point_features as pf
from conftest import assert_compiled_matches_eager
from d2seg.layers.extension import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="d2seg._C not built")

f64 = torch.float64


def _grid_sample(x, pts):
    return F.grid_sample(x, 2 * pts.unsqueeze(2) - 1, align_corners=False).squeeze(3)


def test_point_sample_matches_grid_sample_including_borders_and_outside():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 9, dtype=f64, generator=g, requires_grad=True)
    special = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.3, 0.5], [1.2, 0.4], [0.5, -0.01], [0.5, 1.05],
         [-2.0, -2.0], [1.0 / 18, 1.0 / 12], [0.5, 0.5], [17.0 / 18, 11.0 / 12]],
        dtype=f64,
    )
    pts = torch.cat([special, torch.rand(20, 2, dtype=f64, generator=g) * 1.4 - 0.2])[None].repeat(2, 1, 1)
    pts.requires_grad_()
    out = pf.point_sample(x, pts)
    ref = _grid_sample(x, pts)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, ref)
    go = torch.randn(out.shape, dtype=f64, generator=g)
    for a, b in zip(torch.autograd.grad(out, [x, pts], go), torch.autograd.grad(ref, [x, pts], go)):
        torch.testing.assert_close(a, b)


def test_point_sample_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=f64, generator=g, requires_grad=True)
    pts = (torch.rand(2, 7, 2, dtype=f64, generator=g) * 1.2 - 0.1).requires_grad_()
    assert torch.autograd.gradcheck(pf.point_sample, (x, pts))


def test_point_sample_float32_realistic_single_point_4d_and_noncontiguous():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 50, 68, 64, generator=g).permute(0, 3, 1, 2)  # (1, 64, 50, 68), non-contiguous
    pts = torch.rand(1, 2000, 2, generator=g)
    tol = dict(atol=1e-4, rtol=1e-4)  # float32: grid_sample's vectorised path rounds differently
    torch.testing.assert_close(pf.point_sample(x, pts), _grid_sample(x, pts), **tol)
    one = torch.rand(1, 1, 2, generator=g)
    torch.testing.assert_close(pf.point_sample(x, one), _grid_sample(x, one), **tol)
    grid = torch.rand(1, 3, 4, 2, generator=g)
    out = pf.point_sample(x, grid)
    assert out.shape == (1, 64, 3, 4)
    torch.testing.assert_close(out, F.grid_sample(x, 2 * grid - 1, align_corners=False), **tol)
    # coarse masks of R boxes (R, K, 7, 7) with (R, P, 2) points, PointRend's other use
    coarse = torch.randn(10, 3, 7, 7, generator=g)
    pts = torch.rand(10, 196, 2, generator=g)
    torch.testing.assert_close(pf.point_sample(coarse, pts), _grid_sample(coarse, pts), **tol)


def test_point_sample_empty_and_other_grid_sample_options():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    out = pf.point_sample(x, torch.rand(0, 3, 2))
    assert out.shape == (0, 4, 3)
    out.sum().backward()
    x = torch.randn(2, 4, 5, 5)
    assert pf.point_sample(x, torch.rand(2, 0, 2)).shape == (2, 4, 0)
    pts = torch.rand(2, 6, 2)
    # options the kernel does not implement run F.grid_sample itself
    for kw in (dict(align_corners=True), dict(mode="nearest"), dict(padding_mode="border")):
        torch.testing.assert_close(
            pf.point_sample(x, pts, **kw), F.grid_sample(x, 2 * pts.unsqueeze(2) - 1, **kw).squeeze(3)
        )


def test_point_sample_errors():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="point_coords must be"):
        pf.point_sample(x, torch.rand(3, 6, 2))
    with pytest.raises(ValueError, match="same device"):
        pf.point_sample(x, torch.rand(2, 6, 2, device="meta"))
    with pytest.raises(RuntimeError, match="point coords must have the floating dtype of the features"):
        torch.ops.d2seg.sample_points(x, torch.rand(2, 6, 2, dtype=f64), None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"batch_index must be in \[0, N\)"):
        torch.ops.d2seg.sample_points(x, torch.rand(3, 6, 2), torch.rand(3, 4), torch.tensor([0, 1, 2]), 0.25)


# --------------------------------------- region form --------------------------------------


def _boxes_inputs(dtype=f64, R=7, P=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(3, 4, 16, 20, dtype=dtype, generator=g, requires_grad=True),  # stride 4 of 64x80
        torch.randn(3, 2, 8, 10, dtype=dtype, generator=g, requires_grad=True),  # stride 8
    ]
    xy = torch.rand(R, 2, dtype=dtype, generator=g) * torch.tensor([70.0, 60.0], dtype=dtype) - 5
    wh = torch.rand(R, 2, dtype=dtype, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    batch_index = torch.randint(0, 3, (R,), generator=g)
    pts = torch.rand(R, P, 2, dtype=dtype, generator=g)
    if R:
        pts[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]], dtype=dtype)
    return feats, boxes, batch_index, pts, [1 / 4, 1 / 8]


def test_point_sample_boxes_matches_per_image_grid_sample():
    feats, boxes, bi, pts, scales = _boxes_inputs()
    out = pf.point_sample_boxes(feats, boxes, bi, pts, scales)
    ref = pf.point_sample_boxes_reference(feats, boxes, bi, pts, scales)
    assert out.shape == (7, 6, 11)
    torch.testing.assert_close(out, ref)
    go = torch.randn(out.shape, dtype=f64)
    for a, b in zip(torch.autograd.grad(out, feats, go), torch.autograd.grad(ref, feats, go)):
        torch.testing.assert_close(a, b)


def test_point_sample_boxes_gradcheck():
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, 2, 4, 5, dtype=f64, generator=g, requires_grad=True), torch.randn(2, 1, 2, 3, dtype=f64, generator=g, requires_grad=True)]
    boxes = torch.tensor([[1.0, 2.0, 12.0, 9.0], [-3.0, 0.0, 19.0, 17.0], [4.0, 4.0, 5.0, 6.0]], dtype=f64)
    pts = torch.rand(3, 5, 2, dtype=f64, generator=g)
    fn = lambda a, b: pf.point_sample_boxes([a, b], boxes, torch.tensor([1, 0, 1]), pts, [1 / 4, 1 / 8])  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(feats))


def test_point_sample_boxes_empty():
    feats, boxes, bi, pts, scales = _boxes_inputs(R=0)
    out = pf.point_sample_boxes(feats, boxes, bi, pts, scales)
    assert out.shape == (0, 6, 11)
    out.sum().backward()
    assert feats[0].grad.abs().sum() == 0


def test_point_sample_fine_grained_features_matches_detectron2():
    pr = pytest.importorskip("detectron2.projects.point_rend.point_features")
    from detectron2.structures import Boxes

    feats, boxes, bi, pts, scales = _boxes_inputs(dtype=torch.float32)
    feats = [f.detach() for f in feats]
    order = torch.argsort(bi, stable=True)
    boxes, bi, pts = boxes[order], bi[order], pts[order]
    per_image = [Boxes(boxes[bi == n]) for n in range(3)]
    ours, ours_img = pf.point_sample_fine_grained_features(feats, scales, per_image, pts)
    theirs, theirs_img = pr.point_sample_fine_grained_features(feats, scales, per_image, pts)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_img, theirs_img)


# ---------------------------------- uncertain point selection -----------------------------


def test_uncertain_points_on_grid_by_hand():
    u = torch.zeros(2, 1, 3, 4)
    u[0, 0, 1, 2] = 5.0
    u[0, 0, 2, 0] = 3.0
    u[1, 0, 0, 3] = 1.0
    idx, coords = pf.get_uncertain_point_coords_on_grid(u, 2)
    assert idx[0].tolist() == [1 * 4 + 2, 2 * 4 + 0]
    torch.testing.assert_close(coords[0], torch.tensor([[2.5 / 4, 1.5 / 3], [0.5 / 4, 2.5 / 3]]))
    assert idx[1, 0] == 3
    idx, coords = pf.get_uncertain_point_coords_on_grid(u, 100)
    assert idx.shape == (2, 12) and coords.shape == (2, 12, 2)


def test_uncertain_points_with_randomness_matches_detectron2_and_prefers_uncertain():
    pr = pytest.importorskip("detectron2.projects.point_rend.point_features")
    logits = torch.randn(4, 1, 7, 7)
    unc = lambda l: -l.abs()  # noqa: E731
    torch.manual_seed(0)
    ours = pf.get_uncertain_point_coords_with_randomness(logits, unc, 196, 3, 0.75)
    torch.manual_seed(0)
    theirs = pr.get_uncertain_point_coords_with_randomness(logits, unc, 196, 3, 0.75)
    assert ours.shape == (4, 196, 2)
    torch.testing.assert_close(ours, theirs)
    # the 147 importance-sampled points are more uncertain than uniform ones
    picked = unc(pf.point_sample(logits, ours[:, :147])).mean()
    uniform = unc(pf.point_sample(logits, torch.rand(4, 147, 2))).mean()
    assert picked > uniform
    with pytest.raises(ValueError, match="oversample_ratio"):
        pf.get_uncertain_point_coords_with_randomness(logits, unc, 10, 0.5, 0.75)


# ---------------------------------------- torch.compile -----------------------------------


def test_point_ops_work_under_torch_compile():
    feats, boxes, bi, pts, scales = _boxes_inputs(dtype=torch.float32)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    p = torch.rand(2, 5, 2, requires_grad=True)

    def fn(x, p, f0, f1):
        a = pf.point_sample(x, p).square().sum()
        b = pf.point_sample_boxes([f0, f1], boxes, bi, pts, scales).sigmoid().sum()
        return a + b

    args = (x, p, feats[0], feats[1])
    assert_compiled_matches_eager(fn, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    feats, boxes, bi, pts, scales = _boxes_inputs(dtype=torch.float32)
    out = pf.point_sample_boxes(feats, boxes, bi, pts, scales)
    outc = pf.point_sample_boxes([f.cuda() for f in feats], boxes.cuda(), bi.cuda(), pts.cuda(), scales)
    torch.testing.assert_close(outc.cpu(), out)
    x = torch.randn(2, 5, 9, 9, requires_grad=True)
    p = (torch.rand(2, 30, 2) * 1.2 - 0.1).requires_grad_()
    xc, pc = x.detach().cuda().requires_grad_(), p.detach().cuda().requires_grad_()
    o, oc = pf.point_sample(x, p), pf.point_sample(xc, pc)
    torch.testing.assert_close(oc.cpu(), o)
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, [x, p], g), torch.autograd.grad(oc, [xc, pc], g.cuda())):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
