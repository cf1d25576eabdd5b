"""PointINS building blocks: I^z against the paper's equations 3-5 computed by hand, the
positive sampler (thresholds, cap, type ratios), templates at points against the dense
up-scaling convolution, mask targets and the edge-weighted BCE."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.structures import BitMasks, Instances, PolygonMasks

from d2seg.pointins import (
    PointINSMaskBranch,
    edge_pixels,
    edge_weighted_bce,
    gather_patches,
    instance_info,
    instance_info_size,
    mask_targets,
    sample_positive_pairs,
    type_quotas,
)


# ------------------------------------------------------------------------------ I^z
def test_instance_info_anchor_based_equals_equations_3_to_5():
    # Anchor centred at (20, 30), w=16, h=32, on stride 8; target box centred at (28, 26),
    # w=24, h=40.
    anchors = torch.tensor([[12.0, 14.0, 28.0, 46.0]])
    target = torch.tensor([[16.0, 6.0, 40.0, 46.0]])
    s = torch.tensor([8.0])
    z = instance_info(anchors, target, s)
    rx, ry = (28 - 20) / 8, (26 - 30) / 8  # 1.0, -0.5
    expected = [
        1 / 8, 32 / 16, 32 / 8, 16 / 8,  # I^o = {1/s, h/w, h/s, w/s}
        rx, ry,
        0.5 * 24 / 8 - rx, 0.5 * 24 / 8 + rx,  # p^l, p^r
        0.5 * 40 / 8 + ry, 0.5 * 40 / 8 - ry,  # p^b, p^t
    ]
    assert z.shape == (1, 10)
    torch.testing.assert_close(z[0], torch.tensor(expected))
    # p^l, p^r, p^t, p^b are the distances (in strides) from the anchor centre to the sides.
    assert z[0, 6].item() == pytest.approx((20 - 16) / 8)
    assert z[0, 7].item() == pytest.approx((40 - 20) / 8)
    assert z[0, 8].item() == pytest.approx((46 - 30) / 8)
    assert z[0, 9].item() == pytest.approx((30 - 6) / 8)


def test_instance_info_anchor_free_has_7_values_and_subsets():
    point = torch.tensor([[50.0, 60.0, 50.0, 60.0], [10.0, 10.0, 10.0, 10.0]])
    target = torch.tensor([[40.0, 40.0, 80.0, 70.0], [0.0, 0.0, 20.0, 30.0]])
    s = torch.tensor([16.0, 8.0])
    z = instance_info(point, target, s, anchor_free=True)
    assert z.shape == (2, 7) and instance_info_size(("anchor", "center_offset", "edge_distances"), True) == 7
    assert instance_info_size(("anchor", "center_offset", "edge_distances"), False) == 10
    # point 0: centre (60, 55) -> r = (10/16, -5/16); sides at distance l=10, r=30, t=20, b=10
    torch.testing.assert_close(z[0], torch.tensor([1 / 16, 10 / 16, -5 / 16, 10 / 16, 30 / 16, 10 / 16, 20 / 16]))
    only_edges = instance_info(point, target, s, ["edge_distances"], anchor_free=True)
    torch.testing.assert_close(only_edges, z[:, 3:])
    no_anchor = instance_info(point, target, s, ["edge_distances", "center_offset"])  # canonical order
    torch.testing.assert_close(no_anchor, z[:, 1:])
    with pytest.raises(ValueError, match="INSTANCE_INFO"):
        instance_info(point, target, s, ["corners"])


# ------------------------------------------------------------------------------ sampler
def test_type_quotas_sum_and_proportions():
    assert type_quotas([0.05, 0.05, 0.9], 128) == [7, 6, 115]
    assert type_quotas([0.0, 1.0, 0.0], 128) == [0, 128, 0]
    assert sum(type_quotas([0.3, 0.3, 0.4], 10)) == 10
    with pytest.raises(ValueError, match="SAMPLE_RATIOS"):
        type_quotas([0.5, 0.5], 10)


def test_sampler_thresholds_cap_and_ratios():
    torch.manual_seed(0)
    P = 400
    ious = torch.rand(P, 3)
    ious[:, 1] = 1.0  # GT boxes
    ious[:3, 2] = torch.tensor([0.5, 0.5000001, 0.49])
    cand, types = sample_positive_pairs(ious, 0.5, [0.05, 0.05, 0.9], 128)
    assert len(cand) == 128
    # every drawn pair passes the (strict) box threshold
    assert (ious[cand, types] > 0.5).all()
    # no pair drawn twice
    assert len(set(zip(cand.tolist(), types.tolist()))) == 128
    # enough candidates of every type: the quotas are met exactly
    assert torch.bincount(types, minlength=3).tolist() == [7, 6, 115]
    # the IoU == threshold pair is never drawn even when everything is taken
    cand, types = sample_positive_pairs(ious, 0.5, [0.05, 0.05, 0.9], 0)
    assert not ((cand == 0) & (types == 2)).any()
    assert ((cand == 1) & (types == 2)).any()
    assert len(cand) == int((ious > 0.5).sum())


def test_sampler_fills_short_types_and_never_draws_zero_ratio():
    P = 50
    ious = torch.zeros(P, 3)
    ious[:, 0] = 0.6  # all anchors pass
    ious[:, 1] = 1.0
    ious[:5, 2] = 0.8  # only 5 regressed boxes pass
    cand, types = sample_positive_pairs(ious, 0.5, [0.05, 0.05, 0.9], 64)
    counts = torch.bincount(types, minlength=3).tolist()
    assert len(cand) == 64 and counts[2] == 5  # every good regressed box, rest filled
    assert counts[0] >= 4 and counts[1] >= 3
    cand, types = sample_positive_pairs(ious, 0.5, [0.0, 0.1, 0.9], 64)
    assert (types != 0).all() and len(cand) == 55  # 50 GT + 5 regressed: all there is
    cand, types = sample_positive_pairs(ious[:0], 0.5, [0.05, 0.05, 0.9], 128)
    assert cand.numel() == 0 and types.numel() == 0


# ------------------------------------------------------------------------------ templates
def _branch(**kw):
    args = dict(in_channels=8, anchor_free=False, template_channels=4, template_size=4,
                num_filters=6, mask_head_num_conv=1, mask_head_conv_dim=8)
    args.update(kw)
    return PointINSMaskBranch(**args)


def test_gather_patches_equals_unfold():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    im = torch.tensor([0, 1, 1, 0])
    ys = torch.tensor([0, 4, 2, 3])
    xs = torch.tensor([0, 5, 1, 5])
    p = gather_patches(x, im, ys, xs, 3)
    unf = F.unfold(x, 3, padding=1).reshape(2, 3, 3, 3, 5, 6)
    torch.testing.assert_close(p, unf[im, :, :, :, ys, xs])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_templates_at_points_equal_dense_computation(k):
    torch.manual_seed(0)
    br = _branch(upscale_kernel_size=k, template_channels=9 if k == 3 else 4)
    towers = [torch.randn(2, 8, 6, 7), torch.randn(2, 8, 3, 4)]
    im = torch.tensor([1, 0, 0, 1, 1])
    lv = torch.tensor([0, 1, 0, 1, 0])
    ys = torch.tensor([0, 2, 5, 1, 3])
    xs = torch.tensor([6, 3, 0, 0, 4])
    got = br.templates_at_points(towers, im, lv, ys, xs)
    assert got.shape == (5, br.E, 4, 4)
    for r in range(5):
        dense = br.dense_templates(towers[lv[r]])  # (N, H, W, E, K, K)
        torch.testing.assert_close(got[r], dense[im[r], ys[r], xs[r]], rtol=1e-5, atol=1e-5)


def test_template_layout_puts_E_innermost():
    # The first E channels of the up-scaling output form the top-left template pixel.
    br = _branch(upscale_kernel_size=1, template_channels=9)
    with torch.no_grad():
        br.upscale.weight.zero_()
        br.upscale.bias.copy_(torch.arange(br.upscale.bias.numel(), dtype=torch.float32))
    t = br.templates_at_points([torch.zeros(1, 8, 2, 2)], *[torch.zeros(1, dtype=torch.long)] * 4)
    assert t[0, :, 0, 0].tolist() == list(range(9))
    assert t[0, :, 0, 1].tolist() == list(range(9, 18))


def test_branch_output_shape_and_gradients():
    torch.manual_seed(0)
    br = _branch()
    towers = [torch.randn(1, 8, 5, 5, requires_grad=True)]
    idx = torch.tensor([0, 0])
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 40.0, 24.0]])
    logits = br.predict_points(towers, idx, idx, torch.tensor([1, 3]), torch.tensor([2, 4]),
                               anchors, torch.tensor([8.0, 8.0]), anchors + 2)
    assert logits.shape == (2, 1, 8, 8)
    logits.square().sum().backward()
    for p in (br.upscale.weight, br.instance_aware_weights[0].weight, towers[0]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert br.instance_aware_weights[0].in_features == 10
    assert _branch(anchor_free=True).instance_aware_weights[0].in_features == 7
    assert _branch(instance_info_parts=[]).instance_aware_weights[0].in_features == 8  # the feature


def test_branch_rejects_bad_kernel():
    with pytest.raises(ValueError, match="DYNAMIC_KERNEL_SIZE"):
        _branch(dynamic_kernel_size=2)


# ------------------------------------------------------------------------------ targets / loss
def test_mask_targets_crop_to_target_box():
    m = torch.zeros(2, 32, 32, dtype=torch.bool)
    m[0, 8:24, 8:24] = True
    m[1, 0:16, 16:32] = True
    inst = Instances((32, 32), gt_masks=BitMasks(m))
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 32.0, 32.0], [16.0, 0.0, 32.0, 16.0]])
    t = mask_targets([Instances((32, 32)), inst], torch.tensor([1, 1, 1]), torch.tensor([0, 0, 1]), boxes, 8)
    assert t[0].eq(1).all()  # box == object: all foreground
    assert t[1, 2:6, 2:6].eq(1).all() and t[1, :2].eq(0).all() and t[1, 6:].eq(0).all()
    assert t[2].eq(1).all()
    # polygons (Detectron2's default mask format) give the same targets
    polys = PolygonMasks([[[8, 8, 24, 8, 24, 24, 8, 24]], [[16, 0, 32, 0, 32, 16, 16, 16]]])
    tp = mask_targets([Instances((32, 32)), Instances((32, 32), gt_masks=polys)],
                      torch.tensor([1, 1, 1]), torch.tensor([0, 0, 1]), boxes, 8)
    assert torch.equal(tp, t)


def test_edge_pixels_and_weighted_bce():
    t = torch.zeros(1, 6, 6)
    t[0, 2:4, 2:4] = 1
    e = edge_pixels(t)
    # 3x3 gradient of a 2x2 square: the 4x4 ring around and including it
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[1:5, 1:5] = True
    assert torch.equal(e[0], expect)
    logits = torch.randn(1, 6, 6)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    w = 1 + 3 * expect.float()
    torch.testing.assert_close(edge_weighted_bce(logits, t, 4.0), (bce * w).sum() / w.sum())
    torch.testing.assert_close(edge_weighted_bce(logits, t, 1.0), bce.mean())
    empty = torch.zeros(0, 6, 6, requires_grad=True)
    z = edge_weighted_bce(empty, empty.detach())
    assert z.item() == 0.0 and z.requires_grad
