"""FCOS target assignment, losses and inference on hand-built cases."""
import math

import pytest
import torch

from detectron2.structures import Boxes, Instances

from d2seg.fcos import (
    FCOSLoss,
    assign_targets,
    assign_targets_single_image,
    compute_locations,
    ctrness_targets,
    fcos_inference_single_image,
    iou_loss_ltrb,
    size_ranges_from_sizes_of_interest,
)


# one intra-op thread (conftest.one_thread): on the shared 2-core machine, 2 threads spin-wait
# and make these tiny tensors ~100x slower
pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # classes in these tests
BIG = [[-1.0, 1e8]]


def _assign(locs, boxes, classes, stride=8, ranges=BIG, radius=0.0):
    locs = torch.tensor(locs, dtype=torch.float32)
    M = len(locs)
    return assign_targets_single_image(
        locs,
        torch.full((M,), float(stride)),
        torch.tensor(ranges * M if len(ranges) == 1 else ranges, dtype=torch.float32),
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(classes, dtype=torch.long),
        K,
        radius,
    )


def _instances(boxes, classes, hw=(128, 128)):
    inst = Instances(hw)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def test_compute_locations_are_cell_centres():
    locs = compute_locations(2, 3, 8)
    expected = torch.tensor([[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]], dtype=torch.float32)
    assert torch.equal(locs, expected)


def test_size_ranges_from_sizes_of_interest():
    assert size_ranges_from_sizes_of_interest([64, 128], 3) == [[-1.0, 64.0], [64.0, 128.0], [128.0, 1e8]]
    with pytest.raises(ValueError, match="SIZES_OF_INTEREST"):
        size_ranges_from_sizes_of_interest([64, 128], 5)
    with pytest.raises(ValueError, match="increase"):
        size_ranges_from_sizes_of_interest([128, 64], 3)


@pytest.mark.parametrize("order", [0, 1])
def test_location_in_two_boxes_goes_to_smaller(order):
    big, small = [0, 0, 100, 100], [10, 10, 40, 40]
    boxes = [big, small] if order == 0 else [small, big]
    classes = [0, 2] if order == 0 else [2, 0]
    labels, gt_inds, reg = _assign([[20, 20], [80, 80], [200, 200]], boxes, classes)
    small_idx = 1 if order == 0 else 0
    assert labels.tolist() == [2, 0, K]  # small's class; big's class; background
    assert gt_inds[0].item() == small_idx and gt_inds[2].item() == -1
    assert reg[0].tolist() == [10.0, 10.0, 20.0, 20.0]  # l, t, r, b to the small box
    assert reg[1].tolist() == [80.0, 80.0, 20.0, 20.0]


def test_central_sampling_radius_respected():
    # Box centre (32, 32); stride 8, radius 1.5 -> central square [20, 44] x [20, 44].
    box = [0, 0, 64, 64]
    locs = [[24, 32], [43, 32], [44, 32], [12, 32], [32, 19], [32, 21]]
    labels, _, _ = _assign(locs, [box], [1], stride=8, radius=1.5)
    assert (labels == 1).tolist() == [True, True, False, False, False, True]
    # A larger stride widens the square: radius 1.5 x 16 = 24 -> [8, 56].
    labels, _, _ = _assign(locs, [box], [1], stride=16, radius=1.5)
    assert (labels == 1).tolist() == [True, True, True, True, True, True]
    # Without central sampling every location strictly inside the box is positive.
    labels, _, _ = _assign(locs + [[64, 32]], [box], [1], radius=0.0)
    assert (labels == 1).tolist() == [True] * 6 + [False]


def test_central_region_is_clipped_to_the_box():
    # Thin box 4 px wide: radius 12 px would extend past its sides; the location at
    # x=8 is within 12 px of the centre (x=2) but outside the box.
    labels, _, _ = _assign([[1, 20], [8, 20]], [[0, 0, 4, 40]], [0], stride=8, radius=1.5)
    assert labels.tolist() == [0, K]


def test_level_ranges_respected():
    # Two levels, strides 8 and 16; P3 takes max(l,t,r,b) in [-1, 64], P4 in [64, inf].
    locs = [compute_locations(16, 16, 8), compute_locations(8, 8, 16)]
    ranges = size_ranges_from_sizes_of_interest([64], 2)
    small = [40, 40, 80, 80]  # 40 px: max distance <= 20 -> P3 only
    large = [0, 0, 128, 128]  # max distance >= 64 everywhere -> P4 only
    t = assign_targets(locs, [8, 16], ranges, [_instances([small, large], [0, 1])], K, 1.5)
    pos = t.labels[0] < K
    levels_small = t.fpn_levels[pos & (t.gt_inds[0] == 0)]
    levels_large = t.fpn_levels[pos & (t.gt_inds[0] == 1)]
    assert len(levels_small) > 0 and levels_small.eq(0).all()
    assert len(levels_large) > 0 and levels_large.eq(1).all()
    # Every positive's max distance lies inside its level's range.
    maxd = t.reg_targets[0][pos].max(dim=1).values
    lo = torch.tensor([r[0] for r in ranges])[t.fpn_levels[pos]]
    hi = torch.tensor([r[1] for r in ranges])[t.fpn_levels[pos]]
    assert ((maxd >= lo) & (maxd <= hi)).all()
    # Central sampling on P4 (radius 24 px around (64, 64)): locations 56 and 72 only.
    p4 = pos & (t.fpn_levels == 1)
    assert sorted(set(t.locations[p4][:, 0].tolist())) == [56.0, 72.0]


def test_zero_instance_image_is_all_background():
    locs = [compute_locations(4, 4, 8)]
    t = assign_targets(locs, [8], [[-1, 1e8]], [_instances([], []), _instances([[0, 0, 30, 30]], [2])], K)
    assert t.labels.shape == (2, 16)
    assert t.labels[0].eq(K).all() and t.gt_inds[0].eq(-1).all()
    assert (t.labels[1] == 2).any()


def test_gt_centers_override_box_centres():
    box = [0, 0, 64, 64]
    inst = _instances([box], [1])
    inst.gt_centers = torch.tensor([[8.0, 8.0]])  # e.g. a mask's centre of mass
    locs = [torch.tensor([[8.0, 8.0], [32.0, 32.0]])]
    t = assign_targets(locs, [4], [[-1, 1e8]], [inst], K, 1.5)
    assert t.labels[0].tolist() == [1, K]


def test_ctrness_targets_hand_values():
    reg = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    ctr = ctrness_targets(reg)
    assert torch.allclose(ctr, torch.tensor([1.0, math.sqrt((1 / 3) * (2 / 4))]))
    assert ctrness_targets(torch.zeros(0, 4)).shape == (0,)


def test_iou_losses_hand_values():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]], requires_grad=True)
    target = torch.tensor([[2.0, 2.0, 2.0, 2.0], [2.0, 0.0, 0.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    giou = iou_loss_ltrb(pred, target, "giou")
    # 1: IoU 4/16 = enclosing/union -> 0.75. 2: no overlap, union 10, enclosing 5x3=15
    # -> GIoU = -5/15. 3: identical -> 0.
    assert torch.allclose(giou, torch.tensor([0.75, 1 + 1 / 3, 0.0]), atol=1e-6)
    iou = iou_loss_ltrb(pred[:1], target[:1], "iou")
    assert torch.allclose(iou, torch.tensor([-math.log(0.25)]))
    giou.sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="LOC_LOSS_TYPE"):
        iou_loss_ltrb(pred, target, "l1")


def test_loss_normalisation_and_values():
    loss_fn = FCOSLoss(K)
    N, M = 1, 5
    logits = torch.zeros(N, M, K)
    reg_pred = torch.ones(N, M, 4)
    ctr_pred = torch.zeros(N, M)
    labels = torch.full((N, M), K)
    labels[0, 2] = 1
    reg_t = torch.zeros(N, M, 4)
    reg_t[0, 2] = torch.tensor([2.0, 2.0, 2.0, 2.0])
    out = loss_fn(logits, reg_pred, ctr_pred, labels, reg_t)
    # One positive with centerness 1: loc loss = its GIoU loss (0.75).
    assert out["loss_fcos_loc"].item() == pytest.approx(0.75, abs=1e-6)
    # Centerness BCE(logit 0, target 1) = log 2, over 1 positive.
    assert out["loss_fcos_ctr"].item() == pytest.approx(math.log(2), abs=1e-6)
    # Focal loss at p = 0.5: alpha_t * 0.25 * log 2 per entry; 1 positive entry
    # (alpha 0.25), 14 negative entries (alpha 0.75); divided by 1 positive.
    fl = 0.25 * math.log(2)
    assert out["loss_fcos_cls"].item() == pytest.approx(0.25 * fl + 14 * 0.75 * fl, rel=1e-5)


def test_loss_with_no_positive_is_finite_and_differentiable():
    loss_fn = FCOSLoss(K)
    logits = torch.randn(2, 6, K, requires_grad=True)
    reg_pred = torch.rand(2, 6, 4, requires_grad=True)
    ctr_pred = torch.randn(2, 6, requires_grad=True)
    out = loss_fn(logits, reg_pred, ctr_pred, torch.full((2, 6), K), torch.zeros(2, 6, 4))
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_fcos_loc"].item() == 0 and out["loss_fcos_ctr"].item() == 0
    sum(out.values()).backward()
    assert logits.grad.abs().sum() > 0 and reg_pred.grad is not None


def _single_level_outputs(M, logit_value=-10.0):
    return (
        torch.full((M, K), logit_value),
        torch.ones(M, 4),
        torch.full((M,), 10.0),
    )


def test_inference_decodes_boxes_and_scores():
    locs = compute_locations(4, 4, 8)  # 16 locations
    logits, reg, ctr = _single_level_outputs(16)
    logits[5, 2] = 2.0  # location 5 = (12, 12)
    reg[5] = torch.tensor([1.0, 0.5, 2.0, 1.0])  # x stride 8 -> (8, 4, 16, 8) px
    ctr[5] = 0.0
    r = fcos_inference_single_image(
        [logits], [reg], [ctr], [locs], [8], (32, 32),
        score_thresh=0.05, pre_nms_topk=1000, nms_thresh=0.6, max_detections=100,
    )
    assert len(r) == 1
    assert r.pred_boxes.tensor[0].tolist() == [4.0, 8.0, 28.0, 20.0]
    assert r.scores[0].item() == pytest.approx(math.sqrt(torch.sigmoid(torch.tensor(2.0)).item() * 0.5))
    assert r.pred_classes.tolist() == [2] and r.loc_inds.tolist() == [5]
    assert r.locations[0].tolist() == [12.0, 12.0] and r.fpn_levels.tolist() == [0]


def test_inference_class_aware_nms_and_max_detections():
    locs = compute_locations(4, 4, 8)
    logits, reg, ctr = _single_level_outputs(16, logit_value=5.0)  # all pass the threshold
    reg[:] = 1.0  # every location: 16 x 16 px box
    kw = dict(score_thresh=0.05, pre_nms_topk=1000, nms_thresh=0.6)
    r = fcos_inference_single_image([logits], [reg], [ctr], [locs], [8], (32, 32), max_detections=100, **kw)
    # Neighbouring boxes overlap with IoU 1/3 < 0.6: nothing suppressed across locations;
    # same box in 3 classes: kept in each class.
    assert len(r) == 16 * K
    # Two identical boxes of the same class: the weaker one is suppressed.
    logits2, reg2, ctr2 = _single_level_outputs(2)
    locs2 = torch.tensor([[16.0, 16.0], [16.0, 16.0]])
    logits2[:, 0] = torch.tensor([3.0, 2.0])
    r2 = fcos_inference_single_image([logits2], [reg2], [ctr2], [locs2], [8], (32, 32), max_detections=100, **kw)
    assert len(r2) == 1 and r2.loc_inds.tolist() == [0]
    # Capped at max_detections, best first.
    r3 = fcos_inference_single_image([logits], [reg], [ctr], [locs], [8], (32, 32), max_detections=7, **kw)
    assert len(r3) == 7 and (r3.scores[:-1] >= r3.scores[1:]).all()
    # pre_nms_topk caps candidates per level.
    r4 = fcos_inference_single_image(
        [logits], [reg], [ctr], [locs], [8], (32, 32), max_detections=100,
        score_thresh=0.05, pre_nms_topk=5, nms_thresh=0.6,
    )
    assert len(r4) == 5


def test_inference_zero_detections():
    locs = compute_locations(2, 2, 8)
    logits, reg, ctr = _single_level_outputs(4)
    r = fcos_inference_single_image(
        [logits], [reg], [ctr], [locs], [8], (16, 16),
        score_thresh=0.05, pre_nms_topk=1000, nms_thresh=0.6, max_detections=100,
        extras={"top_feats": [torch.randn(4, 6)]},
    )
    assert len(r) == 0 and r.top_feats.shape == (0, 6) and r.pred_boxes.tensor.shape == (0, 4)
