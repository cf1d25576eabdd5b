"""PointINS models end to end on tiny inputs: both variants train (losses, gradients,
zero-instance batches), the RetinaNet candidates respect IoU(anchor, GT) > threshold,
inference pastes masks inside their boxes and handles zero detections, config errors."""
import os

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from d2seg.config import get_d2seg_cfg

from conftest import CONFIGS

SIZE = 64
SMALL = [
    "MODEL.POINTINS.TEMPLATE_SIZE", "8", "MODEL.POINTINS.NUM_FILTERS", "16",
    "MODEL.POINTINS.MASK_HEAD.NUM_CONV", "1", "MODEL.POINTINS.MASK_HEAD.CONV_DIM", "32",
    "MODEL.RESNETS.DEPTH", "18",
]
RETINA = os.path.join(CONFIGS, "PointINS", "pointins_retinanet_R18_shapes.yaml")
FCOS = os.path.join(CONFIGS, "PointINS", "pointins_fcos_R18_shapes.yaml")


def _cfg(path, *opts):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(path)
    extra = ["MODEL.RETINANET.NUM_CONVS", "1"] if "retinanet" in path else [
        "MODEL.FCOS.NUM_CLS_CONVS", "1", "MODEL.FCOS.NUM_BOX_CONVS", "1", "MODEL.FCOS.SIZES_OF_INTEREST", "[16, 32, 64, 128]"]
    cfg.merge_from_list(SMALL + extra + list(opts))
    return cfg


def _model(path, *opts):
    torch.manual_seed(0)
    return build_model(_cfg(path, *opts))


def _inputs(n=2, empty=()):
    out = []
    for i in range(n):
        inst = Instances((SIZE, SIZE))
        m = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
        m[0, 4:30, 6:40] = True
        m[1, 28:60, 20 + i:52] = True
        if i in empty:
            m = m[:0]
        inst.gt_masks = BitMasks(m)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.tensor([0, 1])[: len(m)]
        g = torch.Generator().manual_seed(i)
        out.append({"image": torch.rand(3, SIZE, SIZE, generator=g) * 255, "instances": inst,
                    "height": SIZE, "width": SIZE})
    return out


@pytest.mark.parametrize("path,det_keys", [
    (RETINA, {"loss_cls", "loss_box_reg"}), (FCOS, {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"})])
def test_training_losses_and_gradients(path, det_keys):
    model = _model(path)
    model.train()
    with EventStorage() as storage:
        losses = model(_inputs())
        assert set(losses) == det_keys | {"loss_mask"}
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_mask"].item() > 0
        sum(losses.values()).backward()
        assert storage.latest()["pointins/num_sampled"][0] > 0
    branch = model.mask_branch if hasattr(model, "mask_branch") else model.mask_head.mask_branch
    assert branch.upscale.weight.grad.abs().sum() > 0
    assert branch.instance_aware_weights[0].weight.grad.abs().sum() > 0
    assert branch.mask_head.predictor.weight.grad.abs().sum() > 0
    assert branch.instance_aware_weights[0].in_features == (10 if path == RETINA else 7)


@pytest.mark.parametrize("path", [RETINA, FCOS])
def test_zero_positives_in_batch(path):
    model = _model(path)
    model.train()
    with EventStorage():
        losses = model(_inputs(empty=(0, 1)))
        assert losses["loss_mask"].item() == 0.0
        sum(losses.values()).backward()
    branch = model.mask_branch if hasattr(model, "mask_branch") else model.mask_head.mask_branch
    assert branch.upscale.weight.grad is not None  # connected, zero
    assert branch.upscale.weight.grad.abs().sum() == 0
    # One empty image among non-empty ones also trains.
    with EventStorage():
        losses = model(_inputs(empty=(1,)))
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"].item() > 0


def test_retinanet_candidates_respect_anchor_iou():
    model = _model(RETINA, "MODEL.POINTINS.ANCHOR_IOU_THRESH", "0.3")
    model.train()
    inputs = _inputs()
    images = model.preprocess_image(inputs)
    feats = [model.backbone(images.tensor)[f] for f in model.head_in_features]
    logits, reg, towers = model.head(feats)
    _, deltas = model._transpose_dense_predictions([logits, reg], [model.num_classes, 4])
    anchors = model.anchor_generator(feats)
    gts = [x["instances"] for x in inputs]
    cands = model.mask_candidates(images, feats, anchors, deltas, gts)
    all_anchors = Boxes.cat(anchors)
    for i, gt in enumerate(gts):
        iou = pairwise_iou(gt.gt_boxes, all_anchors)
        best, arg = iou.max(0)
        sel = cands.im_inds == i
        assert int(sel.sum()) == int((best > 0.3).sum()) > 0
        # anchor column and its IoU, GT column
        ious_here = pairwise_iou(Boxes(cands.anchors[sel]), gt.gt_boxes)
        assert (ious_here[torch.arange(int(sel.sum())), cands.gt_inds[sel]] > 0.3).all()
        torch.testing.assert_close(cands.box_ious[sel, 0], ious_here[torch.arange(int(sel.sum())), cands.gt_inds[sel]])
        torch.testing.assert_close(cands.target_boxes[sel, 1], gt.gt_boxes.tensor[cands.gt_inds[sel]])
        torch.testing.assert_close(cands.target_boxes[sel, 0], cands.anchors[sel])
    # the cell of each candidate is its anchor's: Detectron2 centres anchors at
    # (column, row) * stride (ANCHOR_GENERATOR.OFFSET = 0)
    ctr = (cands.anchors[:, :2] + cands.anchors[:, 2:]) / 2
    torch.testing.assert_close(ctr[:, 0], cands.xs.float() * cands.strides)
    torch.testing.assert_close(ctr[:, 1], cands.ys.float() * cands.strides)
    assert len(set(cands.levels.tolist())) >= 1
    # ANCHOR_CONDITION "DETECTOR": exactly RetinaNet's foreground anchors
    model.anchor_condition = "DETECTOR"
    gt_labels, _ = model.label_anchors(anchors, gts)
    cands = model.mask_candidates(images, feats, anchors, deltas, gts, gt_labels)
    for i in range(len(gts)):
        fg = (gt_labels[i] >= 0) & (gt_labels[i] != model.num_classes)
        assert int((cands.im_inds == i).sum()) == int(fg.sum()) > 0


@pytest.mark.parametrize("path,thresh_key", [
    (RETINA, "MODEL.RETINANET.SCORE_THRESH_TEST"), (FCOS, "MODEL.FCOS.INFERENCE_TH_TEST")])
def test_inference_masks_inside_boxes_and_zero_detections(path, thresh_key):
    model = _model(path, thresh_key, "0.0")
    model.eval()
    branch = model.mask_branch if hasattr(model, "mask_branch") else model.mask_head.mask_branch
    with torch.no_grad():
        branch.mask_head.predictor.bias.fill_(20.0)  # every mask pixel on: the mask is the box
        out = model(_inputs(n=1))[0]["instances"]
    assert 0 < len(out) <= 100
    masks = out.pred_masks
    assert masks.shape == (len(out), SIZE, SIZE) and masks.dtype == torch.bool
    ys = torch.arange(SIZE)[None, :, None] + 0.5
    xs = torch.arange(SIZE)[None, None, :] + 0.5
    b = out.pred_boxes.tensor[:, :, None, None]
    inside = (xs >= b[:, 0] - 1) & (xs <= b[:, 2] + 1) & (ys >= b[:, 1] - 1) & (ys <= b[:, 3] + 1)
    assert not (masks & ~inside).any()  # nothing outside its box
    big = out.pred_boxes.area() > 16
    core = (xs >= b[:, 0] + 1) & (xs <= b[:, 2] - 1) & (ys >= b[:, 1] + 1) & (ys <= b[:, 3] - 1)
    assert (masks | ~core)[big].all()  # and the box filled

    model = _model(path, thresh_key, "1.0")  # no detection at all
    model.eval()
    with torch.no_grad():
        out = model(_inputs(n=2))
    for r in out:
        assert len(r["instances"]) == 0 and r["instances"].pred_masks.shape == (0, SIZE, SIZE)


def test_mask_loss_decreases():
    model = _model(FCOS)
    model.train()
    inputs = _inputs()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    with EventStorage():
        for _ in range(20):
            losses = model(inputs)
            history.append(losses["loss_mask"].item())
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    assert sum(history[-5:]) / 5 < 0.75 * history[0]


def test_config_errors():
    with pytest.raises(ValueError, match="YIELD_BOX_FEATURES"):
        _model(FCOS, "MODEL.FCOS.YIELD_BOX_FEATURES", "False")
    with pytest.raises(ValueError, match="SAMPLE_RATIOS"):
        _model(FCOS, "MODEL.POINTINS.SAMPLE_RATIOS", "[0.05, 0.05, 0.9]")
    with pytest.raises(ValueError, match="INSTANCE_INFO"):
        _model(RETINA, "MODEL.POINTINS.INSTANCE_INFO", "['anchor', 'size']")
    # the ablation of Tables 3-4: I^z from the feature map
    model = _model(RETINA, "MODEL.POINTINS.INSTANCE_INFO", "[]")
    assert model.mask_branch.instance_aware_weights[0].in_features == 64  # the FPN channels


def test_fcos_candidates_are_fcos_positives_with_their_cells_and_boxes():
    model = _model(FCOS)
    model.train()
    inputs = _inputs()
    images = model.preprocess_image(inputs)
    feats = model.backbone(images.tensor)
    gts = [x["instances"] for x in inputs]
    with EventStorage():
        out = model.proposal_generator(images, feats, gts)
    cands = model.mask_head.mask_candidates(out, gts)
    pos = out.positives
    assert len(cands.im_inds) == len(pos) > 0
    s = cands.strides
    # FCOS locations are (column, row) * stride + stride // 2
    torch.testing.assert_close(pos.locations[:, 0].float(), cands.xs.float() * s + (s // 2))
    torch.testing.assert_close(pos.locations[:, 1].float(), cands.ys.float() * s + (s // 2))
    for r in range(len(pos)):
        i, g = pos.im_inds[r].item(), pos.gt_inds[r].item()
        torch.testing.assert_close(cands.target_boxes[r, 1], gts[i].gt_boxes.tensor[g])
    x, y = pos.locations[:, 0], pos.locations[:, 1]
    d = pos.reg_pred.detach() * s[:, None]
    reg = torch.stack([x - d[:, 0], y - d[:, 1], x + d[:, 2], y + d[:, 3]], 1).clamp(0, SIZE)
    torch.testing.assert_close(cands.target_boxes[:, 2], reg)
    assert (cands.box_ious[:, 0] < 0).all() and (cands.box_ious[:, 1] == 1).all()


@pytest.mark.parametrize("name", ["retinanet_R_50_1x", "retinanet_R_101_1x", "fcos_R_50_1x", "fcos_R_101_1x"])
def test_coco_configs_follow_the_paper(name):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "PointINS", name + ".yaml"))
    s, p = cfg.SOLVER, cfg.MODEL.POINTINS
    assert (s.OPTIMIZER, s.BASE_LR, tuple(s.BETAS), s.EPS) == ("ADAM", 5e-5, (0.9, 0.999), 1e-8)
    assert tuple(s.STEPS) == (60000, 82500) and s.MAX_ITER == 90000 and s.IMS_PER_BATCH == 16
    assert (p.TEMPLATE_CHANNELS, p.TEMPLATE_SIZE, p.NUM_FILTERS, p.DYNAMIC_KERNEL_SIZE) == (9, 16, 256, 1)
    assert (p.NUM_SAMPLES, p.ANCHOR_IOU_THRESH, p.BOX_IOU_THRESH, p.MASK_LOSS_WEIGHT, p.EDGE_WEIGHT) == (128, 0.5, 0.5, 2.0, 4.0)
    assert cfg.MODEL.RESNETS.DEPTH == int(name.split("_")[2])
    if name == "retinanet_R_50_1x":  # builds (random weights), 9 anchors, U = 10
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        assert model.anchor_generator.num_cell_anchors[0] == 9
        assert model.mask_branch.instance_aware_weights[0].in_features == 10
        assert model.mask_branch.upscale.weight.shape == (16 * 16 * 9, 256, 3, 3)
