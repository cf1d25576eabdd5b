"""FCOS model: OneStageDetector build/forward/inference, the mask-head extension points,
the optional DCNv2 towers and the AdelaiDet-compatible parameter layout."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances

from d2seg.config import get_d2seg_cfg
from d2seg.fcos import (
    FCOS,
    FCOSHead,
    ModulatedDeformConv2d,
    OneStageDetector,
    OneStageMaskHead,
    build_one_stage_mask_head,
    flatten_levels,
    gather_at_locations,
)


# one intra-op thread (conftest.one_thread): on the shared 2-core machine, 2 threads spin-wait
# and make these tiny tensors ~100x slower
pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 64


def tiny_cfg():
    """R-18-GN-FPN(64) on 64x64 images, 2-conv towers: fast on CPU.

    (64 FPN channels, not 32: GroupNorm(32) on the 1x1 P6/P7 maps needs >= 2 channels
    per group in training.)"""
    cfg = get_d2seg_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "OneStageDetector"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "FCOS"
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    cfg.MODEL.FCOS.NUM_CLS_CONVS = 2
    cfg.MODEL.FCOS.NUM_BOX_CONVS = 2
    cfg.MODEL.FCOS.SIZES_OF_INTEREST = [16, 32, 64, 128]
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    return cfg


def make_input(boxes, classes, size=IMG, seed=0, out_hw=None):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=g) * 50 + 100
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    for b in inst.gt_boxes.tensor.long().tolist():  # bright rectangles: learnable
        img[:, b[1]:b[3], b[0]:b[2]] = 250
    d = {"image": img, "instances": inst}
    if out_hw is not None:
        d["height"], d["width"] = out_hw
    return d


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def test_training_losses_finite_with_zero_instance_image(model):
    model.train()
    batch = [make_input([[8, 8, 30, 40], [34, 20, 60, 50]], [0, 2]), make_input([], [], seed=1)]
    losses = model(batch)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) and v.item() >= 0 for v in losses.values())
    model.zero_grad()
    sum(losses.values()).backward()
    head = model.proposal_generator.fcos_head
    for p in [head.cls_logits.weight, head.bbox_pred.weight, head.ctrness.weight, head.cls_tower[0].weight]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # The scales of the levels that hold positives get gradients.
    assert sum(s.scale.grad.abs().sum() for s in head.scales) > 0
    # A batch without any instance trains too.
    losses = model([make_input([], [], seed=2)])
    assert losses["loss_fcos_loc"].item() == 0 and torch.isfinite(losses["loss_fcos_cls"])
    sum(losses.values()).backward()


def test_inference_returns_instances_capped(model):
    model.eval()
    # Low threshold so that there are candidates before the cap.
    model.proposal_generator.score_thresh_test = 0.0
    try:
        with torch.no_grad():
            out = model([make_input([], [], seed=3), make_input([], [], seed=4, out_hw=(128, 96))])
    finally:
        model.proposal_generator.score_thresh_test = 0.05
    assert len(out) == 2
    for o, hw in zip(out, [(IMG, IMG), (128, 96)]):
        inst = o["instances"]
        assert isinstance(inst, Instances) and inst.image_size == hw
        assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
        assert 0 < len(inst) <= 5
        assert inst.pred_classes.max() < 3 and (inst.scores >= 0).all() and (inst.scores <= 1).all()
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= hw[1]).all() and (b[:, 3] <= hw[0]).all()


def test_inference_with_zero_detections(model):
    model.eval()
    model.proposal_generator.score_thresh_test = 1.1  # nothing passes
    try:
        with torch.no_grad():
            out = model([make_input([], [], seed=5)])
    finally:
        model.proposal_generator.score_thresh_test = 0.05
    assert len(out[0]["instances"]) == 0


def test_loss_decreases_on_fixed_features():
    """FCOS (head, targets, losses) alone on fixed FPN-like features: the loss falls."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    shapes = {f"p{i}": ShapeSpec(channels=32, stride=2**i) for i in range(3, 8)}
    fcos = FCOS(cfg, shapes)
    feats = {f"p{i}": torch.randn(1, 32, max(IMG >> i, 2), max(IMG >> i, 2)) for i in range(3, 8)}
    images = ImageList(torch.zeros(1, 3, IMG, IMG), [(IMG, IMG)])
    gt = [make_input([[8, 8, 30, 40], [34, 20, 60, 50]], [0, 2])["instances"]]
    opt = torch.optim.SGD(fcos.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(20):
        losses = fcos(images, feats, gt).losses
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.5 * totals[0], totals


class _ProbeMaskHead(OneStageMaskHead):
    """A mask head that records what it receives, to test the extension contract."""

    def __init__(self, channels, dim=3):
        super().__init__()
        self.top_module = nn.Conv2d(channels, dim, 3, padding=1)
        self.seen = {}

    def losses(self, images, features, fcos_outputs, gt_instances):
        self.seen["train"] = (fcos_outputs, gt_instances)
        return {"loss_mask": fcos_outputs.positives.top_feats.pow(2).mean()}

    def inference(self, images, features, fcos_outputs, detections):
        self.seen["test"] = (fcos_outputs, detections)
        for d in detections:
            d.mask_scores = d.top_feats[:, 0].sigmoid()
        return detections


def test_mask_head_receives_positives_and_detections():
    cfg = tiny_cfg()
    cfg.MODEL.FCOS.YIELD_BOX_FEATURES = True
    cfg.MODEL.FCOS.YIELD_PROPOSAL = True
    cfg.MODEL.FCOS.INFERENCE_TH_TRAIN = 0.0
    cfg.MODEL.FCOS.POST_NMS_TOPK_TRAIN = 4
    torch.manual_seed(0)
    args = OneStageDetector.from_config(cfg)
    args["mask_head"] = _ProbeMaskHead(64)
    m = OneStageDetector(**args)
    m.train()
    gts = [[[8, 8, 30, 40], [34, 20, 60, 50]], [[10, 30, 40, 62]]]
    batch = [make_input(gts[0], [0, 2]), make_input(gts[1], [1], seed=1)]
    losses = m(batch)
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    sum(losses.values()).backward()
    assert m.mask_head.top_module.weight.grad.abs().sum() > 0

    out, gt_instances = m.mask_head.seen["train"]
    # YIELD_PROPOSAL: detections on the training batch too, capped by POST_NMS_TOPK_TRAIN.
    assert len(out.detections) == 2 and all(0 < len(d) <= 4 for d in out.detections)
    assert out.detections[0].top_feats.shape[1] == 3
    pos = out.positives
    assert len(pos) > 0 and set(pos.im_inds.tolist()) == {0, 1}
    assert pos.top_feats.shape == (len(pos), 3)
    for i in range(len(pos)):
        im, gi = pos.im_inds[i].item(), pos.gt_inds[i].item()
        box = gt_instances[im].gt_boxes.tensor[gi]
        x, y = pos.locations[i].tolist()
        assert box[0] < x < box[2] and box[1] < y < box[3]  # location inside its GT box
        assert pos.gt_classes[i].item() == gt_instances[im].gt_classes[gi].item()
        l, t, r, b = pos.reg_targets[i].tolist()
        assert [x - l, y - t, x + r, y + b] == pytest.approx(box.tolist())
        assert out.strides[pos.fpn_levels[i].item()] in (8, 16, 32, 64, 128)
    # Per-location features line up with the maps they come from.
    box_feat = gather_at_locations(out.bbox_towers, pos.im_inds, pos.loc_inds)
    top = flatten_levels([m.mask_head.top_module(t) for t in out.bbox_towers])[pos.im_inds, pos.loc_inds]
    assert torch.allclose(top, pos.top_feats, atol=1e-5)
    assert box_feat.shape == (len(pos), 64)
    lvl_locs = torch.cat(out.locations)
    assert torch.equal(lvl_locs[pos.loc_inds], pos.locations)

    m.eval()
    m.proposal_generator.score_thresh_test = 0.0
    with torch.no_grad():
        res = m([make_input([], [], seed=6)])
    det_out, dets = m.mask_head.seen["test"]
    d = dets[0]
    assert len(d) > 0 and d.top_feats.shape == (len(d), 3)
    assert torch.equal(torch.cat(det_out.locations)[d.loc_inds], d.locations)
    # at inference the (convolutional) top_module runs at the detections only: the values
    # of the full maps there
    assert det_out.top_feats is None
    top = flatten_levels([m.mask_head.top_module(t) for t in det_out.bbox_towers])[0, d.loc_inds]
    assert torch.allclose(top, d.top_feats, atol=1e-6)
    assert res[0]["instances"].has("mask_scores")


def test_mask_head_registry_lookup_errors():
    cfg = tiny_cfg()
    assert build_one_stage_mask_head(cfg, {}) is None
    cfg.MODEL.ONE_STAGE_MASK_HEAD.NAME = "NoSuchHead"
    with pytest.raises(KeyError, match="ONE_STAGE_MASK_HEAD"):
        build_one_stage_mask_head(cfg, {})


def test_bad_config_errors_name_the_key():
    cfg = tiny_cfg()
    cfg.MODEL.FCOS.SIZES_OF_INTEREST = [64, 128]
    with pytest.raises(ValueError, match="SIZES_OF_INTEREST"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.FCOS.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_model(cfg)
    with pytest.raises(ValueError, match="OUT_CHANNELS"):
        FCOSHead(in_channels=48, num_classes=3, num_levels=5)


def test_adelaidet_parameter_layout():
    head = FCOSHead(in_channels=32, num_classes=3, num_levels=5, use_deformable=True)
    keys = set(head.state_dict())
    expected = set()
    for tower in ("cls_tower", "bbox_tower"):
        for i in (0, 3, 6):  # conv at 0, 3, 6; GroupNorm at 1, 4, 7; DCN at 9; GN at 10
            expected |= {f"{tower}.{i}.weight", f"{tower}.{i}.bias", f"{tower}.{i + 1}.weight", f"{tower}.{i + 1}.bias"}
        expected |= {f"{tower}.9.offset.weight", f"{tower}.9.offset.bias", f"{tower}.9.conv.weight",
                     f"{tower}.9.conv.bias", f"{tower}.10.weight", f"{tower}.10.bias"}
    for p in ("cls_logits", "bbox_pred", "ctrness"):
        expected |= {f"{p}.weight", f"{p}.bias"}
    expected |= {f"scales.{i}.scale" for i in range(5)}
    assert keys == expected
    assert head.cls_tower[9].offset.weight.shape == (27, 32, 3, 3)
    assert head.cls_logits.bias[0].item() == pytest.approx(-4.59512, abs=1e-4)  # prior 0.01


def test_fcos_backbone_p6_from_p5():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_fcos_resnet_fpn_backbone"
    m = build_model(cfg)
    assert m.backbone.top_block.p6.weight.shape[1] == 64  # from P5 (FPN channels), not res5 (512)
    assert m.backbone.top_block.in_feature == "p5"
    m.eval()
    with torch.no_grad():
        feats = m.backbone(torch.zeros(1, 3, IMG, IMG))
    assert [feats[k].shape[-1] for k in ["p3", "p4", "p5", "p6", "p7"]] == [8, 4, 2, 1, 1]


def test_deform_conv_zero_offsets_is_half_masked_conv():
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(4, 5)
    nn.init.normal_(dcn.conv.weight)
    nn.init.normal_(dcn.conv.bias)
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    y = dcn(x)
    # Zero offsets, mask sigmoid(0) = 0.5: half the regular conv, plus the bias.
    ref = 0.5 * torch.nn.functional.conv2d(x, dcn.conv.weight, None, padding=1) + dcn.conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(y, ref, atol=1e-5)
    # Offsets move the sampling: a one-pixel x shift equals the conv of the shifted input.
    with torch.no_grad():
        dcn.offset.bias[1:18:2] = 1.0  # dx = +1 for every kernel tap
        dcn.offset.bias[18:] = 50.0  # mask ~ 1
    y = dcn(x)
    shifted = torch.nn.functional.pad(x[..., 1:], (0, 1))
    ref = torch.nn.functional.conv2d(shifted, dcn.conv.weight, dcn.conv.bias, padding=1)
    # (column 0 differs: its left tap now reads x[0] where the reference reads padding)
    assert torch.allclose(y[..., 1:], ref[..., 1:], atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and dcn.offset.weight.grad.abs().sum() > 0


def test_head_with_deformable_towers_runs():
    head = FCOSHead(in_channels=32, num_classes=3, num_levels=2, use_deformable=True)
    feats = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    out = head(feats, yield_towers=True)
    assert [o.shape for o in out.logits] == [(1, 3, 8, 8), (1, 3, 4, 4)]
    assert (torch.cat([b.flatten() for b in out.bbox_reg]) >= 0).all()
    assert out.bbox_towers[1].shape == (1, 32, 4, 4) and out.top_feats is None


@pytest.mark.parametrize(
    "name", ["fcos_R18_shapes", "retinanet_shapes", "R_50_1x_dcnv2", "R_50_1x", "R_50_3x", "R_101_1x", "R_101_3x"]
)
def test_configs_build(name):
    import os

    from d2seg.engine import setup_cfg

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "FCOS", name + ".yaml")
    cfg = setup_cfg(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], freeze=False)
    if name.startswith("R_"):
        assert cfg.MODEL.FCOS.SIZES_OF_INTEREST == [64, 128, 256, 512]  # paper defaults
        assert cfg.MODEL.RESNETS.DEPTH == int(name.split("_")[1])
        assert cfg.SOLVER.MAX_ITER == (90000 if "1x" in name else 270000)
        if name != "R_50_1x_dcnv2":
            return  # building the other big backbones adds nothing but time
        model = build_model(cfg)
        assert model.backbone.top_block.in_feature == "p5"
        assert isinstance(model.proposal_generator.fcos_head.cls_tower[9], ModulatedDeformConv2d)
        return
    model = build_model(cfg)
    if name == "fcos_R18_shapes":
        model.eval()
        with torch.no_grad():
            out = model([make_input([], [], size=128)])
        assert isinstance(out[0]["instances"], Instances)
