"""CondInst: relative coordinates, parameter layout, losses, ablation switches, zero
instances / detections, postprocessing and the AdelaiDet key mapping."""
import pytest
import torch
import torch.nn.functional as F

from conftest import boxes_input as _input

import d2seg.modeling  # noqa: F401  (registers everything)
from d2seg.condinst import (
    CondInstMaskHead,
    aligned_upsample,
    convert_adelaidet_condinst,
    dice_loss,
    semantic_targets,
)
from d2seg.config import get_d2seg_cfg
from d2seg.layers import dynamic_mask_head_num_params, parse_dynamic_params
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances

SHAPES = {f"p{l}": ShapeSpec(channels=32, stride=2**l) for l in range(3, 8)}


def tiny_cfg(**condinst):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file("configs/CondInst/condinst_R18_shapes.yaml")
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.CONDINST.MASK_BRANCH.CHANNELS = 32
    cfg.MODEL.CONDINST.MASK_BRANCH.NUM_CONVS = 1
    # the hand-computed values below assume these ranges (the paper's / 4), not the shapes
    # config's own
    cfg.MODEL.FCOS.SIZES_OF_INTEREST = [16, 32, 64, 128]
    for k, v in condinst.items():
        node, key = cfg.MODEL.CONDINST, k
        if "." in k:
            sub, key = k.split(".")
            node = node[sub]
        node[key] = v
    return cfg


def head(**condinst):
    cfg = tiny_cfg(**condinst)
    return CondInstMaskHead(cfg, SHAPES)


def test_param_counts_of_paper_and_ablations():
    assert head().num_gen_params == 169  # (8+2)*8+8 + 8*8+8 + 8+1
    assert head(**{"MASK_HEAD.DISABLE_REL_COORDS": True}).num_gen_params == 153
    assert head(**{"MASK_BRANCH.OUT_CHANNELS": 0}).num_gen_params == 2 * 8 + 8 + 72 + 9
    assert head(**{"MASK_HEAD.NUM_LAYERS": 2}).num_gen_params == 88 + 9
    assert head(**{"MASK_HEAD.CHANNELS": 16}).num_gen_params == (10 * 16 + 16) + (16 * 16 + 16) + 17
    assert head().controller.out_channels == 169
    with pytest.raises(ValueError, match="no input"):
        head(**{"MASK_BRANCH.OUT_CHANNELS": 0, "MASK_HEAD.DISABLE_REL_COORDS": True})


def test_parameter_vector_splits_into_layers():
    """169 = weights of layers 0,1,2 (80, 64, 8) then biases (8, 8, 1), (out, in) row-major."""
    p = torch.arange(169.0)[None]
    w, b = parse_dynamic_params(p, in_channels=10, channels=8, num_layers=3)
    assert [tuple(t.shape) for t in w] == [(1, 8, 10), (1, 8, 8), (1, 1, 8)]
    assert [tuple(t.shape) for t in b] == [(1, 8), (1, 8), (1, 1)]
    assert w[0][0, 1, 0] == 10  # row-major (out, in)
    assert w[1][0, 0, 0] == 80 and w[2][0, 0, 0] == 144
    assert b[0][0, 0] == 152 and b[1][0, 0] == 160 and b[2][0, 0] == 168


def _select_params(h, in_idx):
    """Dynamic parameters making the head output input channel ``in_idx`` (if >= 0)
    through ReLU-free positive paths: layer 0 copies channel in_idx (+ shift 100 so the
    ReLU passes it), the following layers copy channel 0, last bias removes the shift."""
    n_in = h.mask_branch.out_channels + 2
    w, b = parse_dynamic_params(torch.zeros(1, h.num_gen_params), n_in, h.channels, h.num_layers)
    w[0][0, 0, in_idx] = 1.0
    b[0][0, 0] = 100.0
    for l in range(1, h.num_layers):
        w[l][0, 0, 0] = 1.0
    b[-1][0, 0] = -100.0
    return torch.cat([t.flatten(1) for t in w] + [t.flatten(1) for t in b], dim=1)


def test_relative_coordinates_for_hand_made_locations():
    """Through the head's wiring: x channel then y channel, pixel centres j*8+4 on P3's
    mask features, divided by the size of interest of the instance's FPN level."""
    h = head().eval()
    soi = [16.0, 32.0, 64.0, 128.0, 256.0]
    assert h.sizes_of_interest.tolist() == soi
    feats = torch.randn(2, 8, 4, 5)
    inst = Instances((32, 40))
    inst.locations = torch.tensor([[12.0, 20.0], [4.0, 4.0], [36.0, 28.0]])
    inst.fpn_levels = torch.tensor([0, 1, 3])
    im_inds = torch.tensor([0, 1, 1])
    for ch, axis in ((0, 0), (1, 1)):
        inst.top_feats = _select_params(h, ch).repeat(3, 1)
        h.mask_out_stride = 8  # read the logits at the mask-feature resolution
        out = h.mask_logits(feats, inst, im_inds)[:, 0]
        h.mask_out_stride = 4
        ys, xs = torch.meshgrid(torch.arange(4) * 8 + 4.0, torch.arange(5) * 8 + 4.0, indexing="ij")
        centre = xs if axis == 0 else ys
        for r in range(3):
            want = (inst.locations[r, axis] - centre) / soi[inst.fpn_levels[r]]
            torch.testing.assert_close(out[r], want)
    # A mask-feature channel selects that image's features.
    inst.top_feats = _select_params(h, 2 + 5).repeat(3, 1)
    h.mask_out_stride = 8
    out = h.mask_logits(feats, inst, im_inds)[:, 0]
    torch.testing.assert_close(out, feats[im_inds, 5])


def test_dynamic_head_equals_layer_by_layer_computation():
    h = head()
    torch.manual_seed(0)
    feats = torch.randn(1, 8, 3, 4)
    inst = Instances((24, 32))
    inst.locations = torch.tensor([[9.0, 5.0]])
    inst.fpn_levels = torch.tensor([2])
    inst.top_feats = torch.randn(1, 169)
    h.mask_out_stride = 8
    out = h.mask_logits(feats, inst, torch.tensor([0]))[0, 0]
    ys, xs = torch.meshgrid(torch.arange(3) * 8 + 4.0, torch.arange(4) * 8 + 4.0, indexing="ij")
    x = torch.cat([torch.stack([(9.0 - xs) / 64, (5.0 - ys) / 64]), feats[0]]).flatten(1)  # (10, 12)
    w, b = parse_dynamic_params(inst.top_feats, 10, 8, 3)
    for l in range(3):
        x = w[l][0] @ x + b[l][0][:, None]
        if l < 2:
            x = x.relu()
    torch.testing.assert_close(out, x.reshape(3, 4), rtol=1e-4, atol=1e-5)


def test_aligned_upsample_keeps_pixel_centres():
    """Values = pixel-centre x of a stride-8 map; upsampled x2 they must equal the
    stride-4 pixel centres (clamped at the borders)."""
    xs = (torch.arange(5) * 8 + 4.0).view(1, 1, 1, 5).expand(1, 1, 3, 5)
    up = aligned_upsample(xs, 2)
    assert up.shape == (1, 1, 6, 10)
    want = (torch.arange(10) * 4 + 2.0).clamp(4, 36)
    torch.testing.assert_close(up[0, 0, 0], want)
    up4 = aligned_upsample(xs, 4)[0, 0, 0]
    torch.testing.assert_close(up4, (torch.arange(20) * 2 + 1.0).clamp(4, 36))


def test_top_left_upsample_is_adelaidets_convention():
    """MODEL.CONDINST.UPSAMPLING "adelaidet": output pixel i reads the input at
    max(i - factor//2, 0) / factor, the last pixel repeated: [a, b] x2 -> [a, a, (a+b)/2, b];
    x4 -> positions 0, 0, 0, 1/4, 1/2, 3/4, 1, 5/4 (clamped to 1)."""
    from d2seg.condinst.mask_branch import top_left_upsample, upsample

    x = torch.tensor([2.0, 6.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    torch.testing.assert_close(top_left_upsample(x, 2)[0, 0, 0], torch.tensor([2.0, 2.0, 4.0, 6.0]))
    torch.testing.assert_close(top_left_upsample(x, 4)[0, 0, 0],
                               torch.tensor([2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0]))
    y = x.transpose(2, 3)  # the same along rows
    torch.testing.assert_close(top_left_upsample(y, 2)[0, 0, :, 0], torch.tensor([2.0, 2.0, 4.0, 6.0]))
    assert torch.equal(upsample(x, 2, "centers"), aligned_upsample(x, 2))
    with pytest.raises(ValueError, match="UPSAMPLING"):
        upsample(x, 2, "nearest")


def test_topk_proposals_per_image_split_over_objects():
    """AdelaiDet's TOPK_PROPOSALS_PER_IM: per image, each object with positives keeps its
    max(1, int(k / #objects)) best positives by cls x centerness."""
    h = head(TOPK_PROPOSALS_PER_IM=4)
    pos = Instances((64, 64))
    pos.im_inds = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    pos.gt_inds = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0])
    pos.logits_pred = torch.tensor([[0.0], [3.0], [1.0], [-1.0], [2.0], [0.0], [1.0], [2.0]])
    pos.ctrness_pred = torch.zeros(8)
    kept = h._sample_positives(pos, 2)
    # image 0: 2 objects -> 2 each (object 0: rows 1, 2; object 1: both); image 1: 1 object -> 4
    assert sorted(kept.logits_pred[:, 0].tolist()) == sorted([3.0, 1.0, -1.0, 2.0, 0.0, 1.0, 2.0])
    h = head(TOPK_PROPOSALS_PER_IM=2)
    kept = h._sample_positives(pos, 2)
    assert sorted(kept.logits_pred[:, 0].tolist()) == sorted([3.0, 2.0, 2.0, 1.0])


def test_mask_centers_of_mass_use_pixel_indices():
    from d2seg.condinst import mask_centers_of_mass

    m = torch.zeros(2, 6, 8)
    m[0, 1:3, 2:6] = 1  # columns 2..5, rows 1..2
    m[1, 5, 7] = 1
    torch.testing.assert_close(mask_centers_of_mass(m), torch.tensor([[3.5, 1.5], [7.0, 5.0]]))
    assert mask_centers_of_mass(torch.zeros(0, 6, 8)).shape == (0, 2)


def test_dice_loss_hand_computation():
    p = torch.tensor([[0.5, 1.0, 0.0, 0.25]])
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - 2 * 1.5 / (0.25 + 1 + 0.0625 + 2)
    torch.testing.assert_close(dice_loss(p, t), torch.tensor([1 - 3.0 / 3.3125]), atol=1e-5, rtol=0)
    assert dice_loss(t, t).item() < 1e-5


def test_semantic_targets_smallest_instance_wins():
    m = torch.zeros(2, 8, 8)
    m[0, :, :] = 1  # big, class 3
    m[1, 2:6, 2:6] = 1  # small, class 1
    t = semantic_targets([m], [torch.tensor([3, 1])], stride=4)  # samples at 2, 6
    assert t.tolist() == [[[2, 4], [4, 4]]]
    assert semantic_targets([torch.zeros(0, 8, 8)], [torch.zeros(0, dtype=torch.long)], 4).tolist() == [[[0, 0], [0, 0]]]


def _tiny_model(**condinst):
    cfg = tiny_cfg(**condinst)
    torch.manual_seed(0)
    return build_model(cfg)


def test_training_losses_gradients_and_zero_instances():
    model = _tiny_model(**{"MASK_BRANCH.SEMANTIC_LOSS_ON": True}).train()
    losses = model([_input(2), _input(0)])
    assert set(losses) >= {"loss_mask", "loss_sem", "loss_fcos_cls"}
    assert 0 < losses["loss_mask"].item() <= 1
    sum(losses.values()).backward()
    assert model.mask_head.controller.weight.grad.abs().sum() > 0
    assert model.mask_head.mask_branch.tower[-1].weight.grad.abs().sum() > 0
    # No instance anywhere: no positives, the mask loss is an exact zero with a graph.
    model.zero_grad()
    losses = model([_input(0), _input(0)])
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    sum(losses.values()).backward()


def test_inference_zero_and_some_detections():
    model = _tiny_model().eval()
    model.proposal_generator.score_thresh_test = 1.1  # nothing passes
    with torch.no_grad():
        r = model([{"image": _input(0)["image"], "height": 32, "width": 48}])[0]["instances"]
    assert len(r) == 0 and r.pred_masks.shape == (0, 32, 48)
    model.proposal_generator.score_thresh_test = 0.0
    with torch.no_grad():
        r = model([{"image": _input(0)["image"], "height": 32, "width": 48}])[0]["instances"]
    assert len(r) > 0 and r.pred_masks.shape == (len(r), 32, 48) and r.pred_masks.dtype == torch.bool
    assert not r.has("pred_global_masks")


def test_postprocess_resizes_full_image_masks():
    h = head()
    res = Instances((8, 8))
    res.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 4.0, 8.0]]))
    res.scores = torch.tensor([0.9])
    res.pred_classes = torch.tensor([1])
    m = torch.zeros(1, 1, 8, 8)
    m[..., :, :4] = 1.0
    res.pred_global_masks = m
    out = h.postprocess(res, 16, 16)
    assert out.pred_masks.shape == (1, 16, 16)
    assert out.pred_masks[0, :, :7].all() and not out.pred_masks[0, :, 9:].any()


def test_adelaidet_key_mapping_loads_strictly():
    model = _tiny_model()
    ours = model.state_dict()
    back = {"mask_head.controller.": "controller.", "mask_head.mask_branch.": "mask_branch."}
    adelai = {}
    for k, v in ours.items():
        for a, b in back.items():
            if k.startswith(a):
                k = b + k[len(a):]
        adelai[k] = v
    assert "controller.weight" in adelai and "mask_branch.tower.0.0.weight" in adelai
    assert not any(k.startswith("mask_head.") for k in adelai)
    model.load_state_dict(convert_adelaidet_condinst(adelai), strict=True)


@pytest.mark.parametrize(
    "name", ["R_50_1x", "R_50_3x", "R_101_1x", "R_101_3x", "R_50_3x_sem", "R_101_3x_sem", "condinst_R18_shapes"]
)
def test_configs_merge_and_build_the_head(name):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(f"configs/CondInst/{name}.yaml")
    assert cfg.MODEL.ONE_STAGE_MASK_HEAD.NAME == "CondInstMaskHead"
    c = cfg.MODEL.FPN.OUT_CHANNELS
    shapes = {f"p{l}": ShapeSpec(channels=c, stride=2**l) for l in range(3, 8)}
    h = CondInstMaskHead(cfg, shapes)
    assert h.num_gen_params == 169 and h.mask_out_stride == 4
    assert h.mask_branch.semantic_loss_on == name.endswith("_sem")


def test_without_mask_features_uses_only_relative_coordinates():
    """Ablation "w/o mask features" (MASK_BRANCH.OUT_CHANNELS 0): the head sees the two
    coordinate channels only; selecting the y channel gives (y_loc - y) / soi."""
    h = head(**{"MASK_BRANCH.OUT_CHANNELS": 0})
    feats = torch.randn(1, 0, 2, 3)
    inst = Instances((16, 24))
    inst.locations = torch.tensor([[8.0, 12.0]])
    inst.fpn_levels = torch.tensor([0])
    inst.top_feats = _select_params(h, 1)
    h.mask_out_stride = 8
    out = h.mask_logits(feats, inst, torch.tensor([0]))[0, 0]
    want = ((12.0 - (torch.arange(2) * 8 + 4.0)) / 16)[:, None].expand(2, 3)
    torch.testing.assert_close(out, want)


def test_inference_batch_of_different_image_sizes():
    model = _tiny_model().eval()
    model.proposal_generator.score_thresh_test = 0.0
    inputs = [{"image": torch.rand(3, 64, 64) * 255}, {"image": torch.rand(3, 48, 64) * 255, "height": 24, "width": 32}]
    with torch.no_grad():
        out = model(inputs)
    r0, r1 = out[0]["instances"], out[1]["instances"]
    assert len(r0) > 0 and r0.pred_masks.shape[1:] == (64, 64)
    assert len(r1) > 0 and r1.pred_masks.shape[1:] == (24, 32)


def test_dice_loss_decreases_when_fitting_dynamic_parameters():
    """Gradient descent on one instance's 169 parameters (through the fused op and the
    upsampling) fits a disc mask: the dice loss must fall well below its start."""
    h = head()
    torch.manual_seed(0)
    feats = torch.randn(1, 8, 8, 8)
    inst = Instances((64, 64))
    inst.locations = torch.tensor([[28.0, 36.0]])
    inst.fpn_levels = torch.tensor([1])
    params = (torch.randn(1, 169) * 0.3).requires_grad_()
    ys, xs = torch.meshgrid(torch.arange(16) * 4 + 2.0, torch.arange(16) * 4 + 2.0, indexing="ij")
    target = (((xs - 28) ** 2 + (ys - 36) ** 2) < 14**2).float()[None, None]
    opt = torch.optim.Adam([params], lr=0.05)
    losses = []
    for _ in range(60):
        inst.top_feats = params
        loss = dice_loss(h.mask_logits(feats, inst, torch.tensor([0])).sigmoid(), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.2
