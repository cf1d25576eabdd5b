"""SparseInst: matcher, losses (against hand computations), decoder pieces, model shapes,
zero-instance training, inference without detections, and a short overfit."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import d2seg  # noqa: F401  (registers SparseInst)
from d2seg.config import get_d2seg_cfg
from d2seg.sparseinst.decoder import (GroupInstanceBranch, aggregate_instance_features, coordinate_features,
                                      iam_location_prior)
from d2seg.sparseinst.encoder import adaptive_avg_pool2d_exportable
from d2seg.sparseinst.loss import SparseInstCriterion, dice_loss, mask_iou, sigmoid_focal_loss
from d2seg.sparseinst.matcher import SparseInstMatcher, dice_coefficient, hungarian_match, matching_score
from d2seg.sparseinst.sparseinst import masks_to_boxes
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances


def tiny_cfg(num_masks=10, num_classes=3, decoder="GroupIAMDecoder"):
    cfg = get_d2seg_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SparseInst"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    si = cfg.MODEL.SPARSE_INST
    si.ENCODER.NUM_CHANNELS = 32
    si.DECODER.NAME = decoder
    si.DECODER.NUM_MASKS = num_masks
    si.DECODER.NUM_CLASSES = num_classes
    si.DECODER.INST.DIM = 32
    si.DECODER.MASK.DIM = 32
    si.DECODER.INST.CONVS = 2
    si.DECODER.MASK.CONVS = 2
    si.DECODER.KERNEL_DIM = 16
    return cfg


def make_instances(h, w, boxes, classes):
    inst = Instances((h, w))
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


# ----------------------------------------------------------------------------- matching
def test_hungarian_beats_greedy_on_hand_matrix():
    # Greedy takes (0, 0) = 0.9 then (1, 1) = 0.1 (total 1.0); the optimum is 0.8 + 0.85.
    score = torch.tensor([[0.9, 0.8], [0.85, 0.1], [0.2, 0.3]])
    rows, cols = hungarian_match(score)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    assert math.isclose(score[rows, cols].sum().item(), 1.65, rel_tol=1e-6)


def test_hungarian_more_predictions_than_targets_and_empty():
    score = torch.tensor([[0.1], [0.7], [0.3]])
    rows, cols = hungarian_match(score)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    rows, cols = hungarian_match(torch.zeros(4, 0))
    assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64
    with pytest.raises(FloatingPointError):
        hungarian_match(torch.tensor([[float("nan")]]))


def test_dice_and_matching_score_by_hand():
    m = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    d = dice_coefficient(m, t)
    # row 0: 2 * (1 + 0.5) / ((1 + 0.25 + 0.25) + 2) = 3 / 3.5 ; row 1: 0
    assert torch.allclose(d, torch.tensor([[3 / (3.5 + 1e-4)], [0.0]]), atol=1e-7)
    probs = torch.tensor([[0.1, 0.6], [0.9, 0.2]])
    s = matching_score(probs, torch.tensor([1]), m, t, alpha=0.8, beta=0.2)
    assert torch.allclose(s[0, 0], torch.tensor(0.6 ** 0.2 * (3 / 3.5001) ** 0.8), atol=1e-6)
    assert s[1, 0].item() == 0.0


def test_matcher_prefers_mask_overlap_over_class():
    # Prediction 0 has the right class but the wrong mask; prediction 1 the right mask.
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    pred_masks = torch.tensor([[-9.0, -9.0, 9.0, 9.0], [9.0, 9.0, -9.0, -9.0]])
    pred_logits = torch.tensor([[3.0, -3.0], [0.0, 0.0]])
    rows, cols = SparseInstMatcher(0.8, 0.2)(pred_logits, pred_masks, torch.tensor([0]), gt)
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_matcher_location_term_gives_objects_to_nearby_grid_cells():
    from d2seg.sparseinst.matcher import grid_cell_centres, mask_centroids

    # 4 predictions on a 2 x 2 grid over a 4 x 4 mask map; identical predictions (the
    # symmetric start), two objects: one in the bottom-right quadrant, one top-left
    gt = torch.zeros(2, 4, 4)
    gt[0, 2:, 2:] = 1.0
    gt[1, 0, 0] = 1.0
    cells = grid_cell_centres(4)
    assert torch.allclose(cells, torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    assert torch.allclose(mask_centroids(gt.flatten(1), (4, 4)), torch.tensor([[0.75, 0.75], [0.125, 0.125]]))
    assert torch.allclose(mask_centroids(torch.zeros(1, 16), (4, 4)), torch.tensor([[0.5, 0.5]]))
    logits = torch.zeros(4, 3)
    masks = torch.zeros(4, 16)
    classes = torch.tensor([0, 2])
    rows, cols = SparseInstMatcher(0.8, 0.2, location_sigma=0.1)(logits, masks, classes, gt.flatten(1), mask_hw=(4, 4))
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 0}
    # the term multiplies the paper's score: off (0) by default, which is the reference's matching
    ref = SparseInstMatcher(0.8, 0.2)
    assert ref.location_sigma == 0.0 and tiny_cfg().MODEL.SPARSE_INST.MATCHER.LOCATION_SIGMA == 0.0
    with pytest.raises(ValueError, match="mask_hw"):
        SparseInstMatcher(0.8, 0.2, location_sigma=0.1)(logits, masks, classes, gt.flatten(1))
    with pytest.raises(ValueError, match="LOCATION_SIGMA"):
        SparseInstMatcher(0.8, 0.2, location_sigma=-0.1)


# ----------------------------------------------------------------------------- losses
def test_focal_loss_by_hand():
    logits = torch.tensor([0.0, 0.0, 2.0])
    targets = torch.tensor([1.0, 0.0, 0.0])
    p2 = 1 / (1 + math.exp(-2.0))
    expected = 0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2) + 0.75 * p2 ** 2 * -math.log(1 - p2)
    assert math.isclose(sigmoid_focal_loss(logits, targets, 0.25, 2.0).item(), expected, rel_tol=1e-5)


def test_dice_loss_and_iou_by_hand():
    logits = torch.tensor([[0.0, 20.0, -20.0, 20.0]])  # probs 0.5, 1, 0, 1
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - 2 * (0.5 + 1) / ((0.25 + 1 + 0 + 1) + 2)
    assert math.isclose(dice_loss(logits, t).item(), 1 - 3 / (4.25 + 1e-4), rel_tol=1e-5)
    # binarised at 0.4: [1, 1, 0, 1] vs [1, 1, 0, 0]: IoU 2 / 3
    assert math.isclose(mask_iou(logits, t).item(), 2 / 3, rel_tol=1e-5)


def test_criterion_by_hand():
    """One image, N=2, C=2, P=4, one ground truth of class 1: every weighted loss by hand."""
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -0.5]]], requires_grad=True)
    masks = torch.tensor([[[[3.0, 1.0], [-2.0, -4.0]], [[-3.0, -3.0], [2.0, 2.0]]]], requires_grad=True)
    scores = torch.tensor([[[0.3], [-0.2]]], requires_grad=True)
    gt_masks = [torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])]
    gt_classes = [torch.tensor([1])]
    crit = SparseInstCriterion(2, SparseInstMatcher(0.8, 0.2), class_weight=2.0, dice_weight=2.0,
                               pixel_weight=2.0, objectness_weight=1.0)
    losses = crit({"pred_logits": logits, "pred_masks": masks, "pred_scores": scores}, gt_classes, gt_masks)

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # prediction 0 matches (its mask covers the ground truth); its class-1 logit is the positive
    def focal(x, t):
        p = sig(x)
        pt = p if t else 1 - p
        a = 0.25 if t else 0.75
        return -a * (1 - pt) ** 2 * math.log(pt)
    cls = focal(-1.0, 0) + focal(2.0, 1) + focal(0.5, 0) + focal(-0.5, 0)
    m = [sig(3.0), sig(1.0), sig(-2.0), sig(-4.0)]
    t = [1, 1, 0, 0]
    dice = 1 - 2 * (m[0] + m[1]) / (sum(v * v for v in m) + 2 + 1e-4)
    bce = sum(-(ti * math.log(mi) + (1 - ti) * math.log(1 - mi)) for mi, ti in zip(m, t)) / 4
    iou = 1.0  # sigmoid >= 0.4 on the first two pixels exactly
    obj = -(iou * math.log(sig(0.3)) + (1 - iou) * math.log(1 - sig(0.3)))
    assert math.isclose(losses["loss_cls"].item(), 2 * cls, rel_tol=1e-5)
    assert math.isclose(losses["loss_dice"].item(), 2 * dice, rel_tol=1e-5)
    assert math.isclose(losses["loss_mask"].item(), 2 * bce, rel_tol=1e-5)
    assert math.isclose(losses["loss_objectness"].item(), obj, rel_tol=1e-5)
    sum(losses.values()).backward()
    assert masks.grad[0, 1].abs().sum() == 0  # the unmatched prediction gets no mask gradient
    assert logits.grad[0, 1].abs().sum() > 0  # but is pushed towards background


def test_criterion_with_zero_instances():
    logits = torch.zeros(2, 3, 2, requires_grad=True)
    masks = torch.zeros(2, 3, 4, 4, requires_grad=True)
    scores = torch.zeros(2, 3, 1, requires_grad=True)
    crit = SparseInstCriterion(2)
    losses = crit({"pred_logits": logits, "pred_masks": masks, "pred_scores": scores},
                  [torch.zeros(0, dtype=torch.int64)] * 2, [torch.zeros(0, 4, 4)] * 2)
    # all 12 logits are negatives at p = 0.5: 0.75 * 0.25 * ln 2 each, normalised by max(K, 1) = 1
    assert math.isclose(losses["loss_cls"].item(), 2 * 12 * 0.75 * 0.25 * math.log(2), rel_tol=1e-5)
    for k in ("loss_dice", "loss_mask", "loss_objectness"):
        assert losses[k].item() == 0.0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0


def test_criterion_rejects_bad_classes():
    crit = SparseInstCriterion(2)
    out = {"pred_logits": torch.zeros(1, 3, 2), "pred_masks": torch.zeros(1, 3, 2, 2), "pred_scores": torch.zeros(1, 3, 1)}
    with pytest.raises(ValueError, match="outside"):
        crit(out, [torch.tensor([5])], [torch.zeros(1, 2, 2)])


# ----------------------------------------------------------------------------- decoder pieces
def test_coordinates_and_aggregation():
    c = coordinate_features(torch.zeros(1, 5, 3, 4))
    assert torch.allclose(c[0, 0, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))  # x along W
    assert torch.allclose(c[0, 1, :, 0], torch.tensor([-1.0, 0.0, 1.0]))  # y along H
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    x = torch.arange(8.0).view(1, 2, 2, 2)
    z = aggregate_instance_features(a, x)
    assert torch.allclose(z[0, 0], torch.tensor([0.0, 4.0]))
    assert torch.allclose(z[0, 1], torch.tensor([0.5, 4.5]))


def test_group_iam_concatenates_groups_per_instance():
    torch.manual_seed(0)
    br = GroupInstanceBranch(6, groups=2, dim=8, num_convs=1, num_masks=3, kernel_dim=4, num_classes=2)
    x = torch.randn(1, 6, 5, 5)
    feats = br.inst_convs(x)
    iam = br.iam_conv(feats).sigmoid()  # (1, 2*3, 5, 5), group-major channels
    z = aggregate_instance_features(iam, feats)  # (1, 6, 8)
    manual = torch.cat([z[:, 0:3], z[:, 3:6]], dim=-1)  # instance n: [group0 map n, group1 map n]
    logits, kernels, obj, _ = br(x)
    assert torch.allclose(logits, br.cls_score(F.relu(br.fc(manual))), atol=1e-6)
    assert kernels.shape == (1, 3, 4) and obj.shape == (1, 3, 1)


def test_iam_location_prior_places_each_instance_on_its_grid_cell():
    # 9 instances on a 3 x 3 grid over a 6 x 6 map: instance i peaks on the 2 x 2 block of cell i
    prior = iam_location_prior(9, 6, 6, sigma=0.1)
    assert prior.shape == (9, 6, 6) and (prior <= 0).all()
    for i in range(9):
        r, c = divmod(i, 3)
        peak = prior[i] > prior[i].max() - 1e-4
        assert peak[2 * r:2 * r + 2, 2 * c:2 * c + 2].all() and peak.sum() == 4
    # -d^2 / (2 sigma^2) by hand: instance 0's centre is (1/6, 1/6); pixel (0, 5) at (1/12, 11/12)
    d2 = (1 / 12 - 1 / 6) ** 2 + (11 / 12 - 1 / 6) ** 2
    assert math.isclose(prior[0, 0, 5].item(), -d2 / 0.02, rel_tol=1e-5)
    # N not a square: 10 instances on a 4 x 4 grid, the last one in row 2
    assert iam_location_prior(10, 8, 8, 0.1)[9].argmax().item() == 4 * 8 + 2


def test_location_prior_off_by_default_and_localises_aggregation_when_on():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    off = GroupInstanceBranch(6, groups=2, dim=8, num_convs=1, num_masks=4, kernel_dim=4, num_classes=2)
    on = GroupInstanceBranch(6, groups=2, dim=8, num_convs=1, num_masks=4, kernel_dim=4, num_classes=2,
                             location_prior=0.15)
    on.load_state_dict(off.state_dict())  # the prior adds no parameters: checkpoints load either way
    assert off.location_prior == 0.0 and tiny_cfg().MODEL.SPARSE_INST.DECODER.IAM_LOCATION_PRIOR == 0.0
    iam_off, iam_on = off(x)[3], on(x)[3]
    prior = iam_location_prior(4, 8, 8, 0.15).repeat(2, 1, 1)
    assert torch.allclose(iam_on, iam_off + prior, atol=1e-6)
    # with the prior the 4 instances' maps put most of their mass in their own quadrant
    a = iam_on.sigmoid()[0, :4]
    mass = a / a.sum((1, 2), keepdim=True)
    quads = [mass[0, :4, :4], mass[1, :4, 4:], mass[2, 4:, :4], mass[3, 4:, 4:]]
    assert all(q.sum() > 0.8 for q in quads)
    with pytest.raises(ValueError, match="IAM_LOCATION_PRIOR"):
        GroupInstanceBranch(6, groups=2, dim=8, num_convs=1, num_masks=4, kernel_dim=4, num_classes=2,
                            location_prior=-1.0)
    cfg = tiny_cfg(num_masks=4)
    cfg.MODEL.SPARSE_INST.DECODER.IAM_LOCATION_PRIOR = 0.15
    model = build_model(cfg)
    assert model.decoder.inst_branch.location_prior == 0.15


def test_location_prior_is_relative_to_each_image_in_a_padded_batch():
    """An image alone and the same image padded in a batch with a larger one get the same
    location prior on its own cells (the prior measures positions over the image, not over
    the padded batch)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(num_masks=4)
    cfg.MODEL.SPARSE_INST.DECODER.IAM_LOCATION_PRIOR = 0.15
    model = build_model(cfg).eval()
    iam_conv = model.decoder.inst_branch.iam_conv
    with torch.no_grad():  # IAM logits = the prior alone
        iam_conv.weight.zero_()
        iam_conv.bias.zero_()
    seen = []
    hook = model.decoder.inst_branch.register_forward_hook(lambda m, i, out: seen.append(out[3]))
    small = {"image": torch.randint(0, 255, (3, 64, 96)).float()}  # a multiple of 32: unpadded alone
    large = {"image": torch.randint(0, 255, (3, 128, 128)).float()}
    with torch.no_grad():
        model([small])
        model([small, large])
    hook.remove()
    alone, batch = seen
    assert alone.shape[-2:] == (8, 12) and batch.shape[-2:] == (16, 16)
    assert torch.allclose(batch[0, :, :8, :12], alone[0], atol=1e-5)
    # instance 3 (bottom-right cell) peaks in the bottom-right quarter of each image
    r, c = divmod(int(batch[0, 3].argmax()), 16)
    assert 4 <= r < 8 and 6 <= c < 12
    r, c = divmod(int(batch[1, 3].argmax()), 16)
    assert 8 <= r < 16 and 8 <= c < 16


def test_location_matching_is_relative_to_each_image_in_a_padded_batch():
    """The matcher's location term gives an object the same prediction whether its image is
    alone or padded in a batch: the mask centroid is measured over the image."""
    from d2seg.sparseinst.matcher import image_extents, mask_centroids

    # a 32 x 48 px image (4 x 6 mask map) with one object in its bottom-left quarter: cell 2 of
    # the 2 x 2 grid; in a batch padded to 64 x 64 px (8 x 8) it covers (0.5, 0.75) of the map
    extents = image_extents([(32, 48), (64, 64)], (64, 64))
    assert extents == [(0.5, 0.75), (1.0, 1.0)]
    gt = torch.zeros(1, 4, 6)
    gt[0, 2:, :3] = 1.0
    padded_gt = F.pad(gt, (0, 2, 0, 4))
    assert torch.allclose(mask_centroids(padded_gt.flatten(1), (8, 8), extents[0]),
                          mask_centroids(gt.flatten(1), (4, 6)))
    # distinct predictions: constant mask logits (-30, about 0, in the padding)
    levels = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    alone_masks = levels.view(1, 4, 1, 1).expand(1, 4, 4, 6).clone()
    batch_masks = torch.full((2, 4, 8, 8), -30.0)
    batch_masks[0, :, :4, :6] = alone_masks[0]
    classes = [torch.tensor([1])]
    criterion = SparseInstCriterion(2, SparseInstMatcher(0.8, 0.2, location_sigma=0.1))
    matcher = criterion.matcher
    rows, _ = matcher(torch.zeros(4, 2), alone_masks[0].flatten(1), classes[0], gt.flatten(1), mask_hw=(4, 6))
    assert rows.tolist() == [2]
    rows, _ = matcher(torch.zeros(4, 2), batch_masks[0].flatten(1), classes[0], padded_gt.flatten(1), mask_hw=(8, 8),
                      extent=extents[0])
    assert rows.tolist() == [2]
    # through the criterion: the dice loss of the matched pair is the same alone and in the batch
    alone = criterion({"pred_logits": torch.zeros(1, 4, 2), "pred_masks": alone_masks,
                       "pred_scores": torch.zeros(1, 4, 1)}, classes, [gt])
    batch = criterion({"pred_logits": torch.zeros(2, 4, 2), "pred_masks": batch_masks,
                       "pred_scores": torch.zeros(2, 4, 1)}, classes + [torch.zeros(0, dtype=torch.int64)],
                      [padded_gt, torch.zeros(0, 8, 8)], extents)
    expected = 2.0 * (1.0 - float(dice_coefficient(levels[2:3].sigmoid().expand(1, 24), gt.flatten(1))))
    assert math.isclose(float(alone["loss_dice"]), expected, rel_tol=1e-5)
    assert math.isclose(float(batch["loss_dice"]), expected, rel_tol=1e-5)


@pytest.mark.parametrize("h,w", [(5, 7), (6, 6), (4, 9)])
def test_exportable_adaptive_pool_matches_torch(h, w):
    x = torch.randn(2, 3, h, w)
    for s in (1, 2, 3, 6):
        assert torch.allclose(adaptive_avg_pool2d_exportable(x, s), F.adaptive_avg_pool2d(x, s), atol=1e-6)


def test_masks_to_boxes():
    m = torch.zeros(2, 6, 8, dtype=torch.bool)
    m[0, 1:3, 2:5] = True
    boxes = masks_to_boxes(m).tensor
    assert boxes.tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- model
def test_model_output_shapes_and_inference():
    torch.manual_seed(0)
    cfg = tiny_cfg(num_masks=10, num_classes=3)
    cfg.MODEL.SPARSE_INST.CLS_THRESHOLD = 0.0
    model = build_model(cfg)
    img = torch.randint(0, 255, (3, 96, 120)).float()  # padded to 96 x 128
    images = model.preprocess_image([{"image": img}, {"image": img}])
    out = model.predict(images.tensor)
    assert out["pred_logits"].shape == (2, 10, 3)
    assert out["pred_masks"].shape == (2, 10, 24, 32)
    assert out["pred_scores"].shape == (2, 10, 1)
    model.eval()
    res = model([{"image": img, "height": 48, "width": 60}])[0]["instances"]
    assert res.image_size == (48, 60)
    assert res.pred_masks.shape == (10, 48, 60) and res.pred_masks.dtype == torch.bool
    assert res.scores.shape == (10,) and res.pred_classes.shape == (10,) and len(res.pred_boxes) == 10
    assert ((res.scores >= 0) & (res.scores <= 1)).all()


def test_inference_with_no_detections():
    cfg = tiny_cfg()
    cfg.MODEL.SPARSE_INST.CLS_THRESHOLD = 1.0  # nothing can pass
    model = build_model(cfg).eval()
    res = model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])[0]["instances"]
    assert len(res) == 0 and res.pred_masks.shape == (0, 64, 64) and res.pred_boxes.tensor.shape == (0, 4)


def test_training_with_zero_instance_image():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    empty = Instances((64, 64))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)  # no gt_masks field, as Detectron2 makes it
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": empty},
             {"image": torch.rand(3, 64, 64) * 255, "instances": make_instances(64, 64, [(4, 4, 30, 30)], [2])}]
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_dice", "loss_mask", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    losses = model(batch[:1])  # a batch with no instances at all
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_dice"].item() == 0.0
    sum(losses.values()).backward()


def test_targets_are_area_downsampled_and_padded():
    model = build_model(tiny_cfg())
    inst = make_instances(60, 64, [(0, 0, 8, 8)], [1])
    classes, masks = model.prepare_targets([inst], (64, 64), (16, 16))
    assert classes[0].tolist() == [1] and masks[0].shape == (1, 16, 16)
    assert masks[0][0, :2, :2].eq(1).all() and masks[0].sum().item() == 4.0


def test_decoder_and_criterion_fit_fixed_features():
    """Learnability at the decoder: on fixed encoder features, AdamW steps on the matched
    losses lower the total loss and make the predicted masks overlap the targets."""
    from d2seg.sparseinst.decoder import GroupIAMDecoder

    torch.manual_seed(0)
    dec = GroupIAMDecoder(16, num_masks=6, num_classes=2, kernel_dim=8, inst_dim=16, inst_convs=2, mask_dim=16,
                          mask_convs=2, groups=4)
    crit = SparseInstCriterion(2)
    feats = torch.randn(1, 16, 8, 8)
    t = torch.zeros(2, 16, 16)
    t[0, 1:7, 1:7] = 1
    t[1, 9:15, 8:16] = 1
    classes = [torch.tensor([0, 1])]
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    totals = []
    for _ in range(60):
        loss = sum(crit(dec(feats), classes, [t]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5]), totals
    out = dec(feats)
    rows, cols = crit.matcher(out["pred_logits"][0], out["pred_masks"][0].flatten(1), classes[0], t.flatten(1))
    dice = dice_coefficient(out["pred_masks"][0, rows].flatten(1).sigmoid(), t[cols].flatten(1)).diagonal()
    assert (dice > 0.7).all(), dice


def test_bad_config_errors_are_clear():
    cfg = tiny_cfg()
    cfg.MODEL.SPARSE_INST.ENCODER.IN_FEATURES = ["res2", "res3", "res4"]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.SPARSE_INST.DECODER.NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="DECODER.NAME"):
        build_model(cfg)
