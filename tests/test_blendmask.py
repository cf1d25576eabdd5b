"""BlendMask: blender against a hand computation, base cropping, attention layout,
losses with and without instances, zero detections, AdelaiDet key mapping."""
import math

import pytest
import torch

from conftest import boxes_input as _input

import d2seg.modeling  # noqa: F401
from d2seg.blendmask import BlendMaskHead, blend, convert_adelaidet_blendmask, crop_bases
from d2seg.config import get_d2seg_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

SHAPES = {f"p{l}": ShapeSpec(channels=32, stride=2**l) for l in range(3, 8)}


def tiny_cfg():
    cfg = get_d2seg_cfg()
    cfg.merge_from_file("configs/BlendMask/blendmask_R18_shapes.yaml")
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.BASIS_MODULE.CONVS_DIM = 32
    cfg.MODEL.BASIS_MODULE.NUM_CONVS = 1
    cfg.MODEL.BLENDMASK.BOTTOM_RESOLUTION = 14
    return cfg


def test_blend_equals_hand_computation():
    """K=2 bases, S=M=2 (interpolation is the identity): softmax over K, weighted sum."""
    rois = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    l3 = math.log(3.0)
    attns = torch.tensor([[[0.0, 0.0], [l3, 0.0]], [[0.0, l3], [0.0, 0.0]]]).reshape(1, 8)
    # (0,0): .5*1+.5*5; (0,1): .25*2+.75*6; (1,0): .75*3+.25*7; (1,1): .5*4+.5*8
    torch.testing.assert_close(blend(rois, attns, 2), torch.tensor([[[3.0, 5.0], [4.0, 6.0]]]))


def test_blend_upsamples_attentions_and_rejects_bad_sizes():
    rois = torch.randn(3, 4, 8, 8)
    attns = torch.randn(3, 4)  # M = 1: one weight per basis, constant over the box
    w = attns.softmax(dim=1)
    torch.testing.assert_close(blend(rois, attns, 1), (rois * w[:, :, None, None]).sum(1))
    with pytest.raises(ValueError, match="K\\*M\\*M"):
        blend(rois, torch.randn(3, 4 * 4), 1)
    assert blend(rois[:0], attns[:0], 1).shape == (0, 8, 8)


def test_crop_bases_samples_cell_centres():
    """Bases (stride 4) whose value is the x (resp. y) of their pixel centre; the S x S
    crop of a box must read the box's cell centres."""
    xs = (torch.arange(10) * 4 + 2.0)
    bases = torch.stack([xs[None].expand(10, 10), xs[:, None].expand(10, 10)])[None]  # (1, 2, 10, 10)
    bases = torch.cat([bases, bases + 100])  # second image offset by 100
    boxes = torch.tensor([[8.0, 12.0, 24.0, 20.0], [8.0, 12.0, 24.0, 20.0]])
    out = crop_bases(bases, boxes, torch.tensor([0, 1]), size=4, scale=0.25)
    cx = 8 + (torch.arange(4) + 0.5) * 4
    cy = 12 + (torch.arange(4) + 0.5) * 2
    torch.testing.assert_close(out[0, 0], cx[None].expand(4, 4))
    torch.testing.assert_close(out[0, 1], cy[:, None].expand(4, 4))
    torch.testing.assert_close(out[1], out[0] + 100)
    assert crop_bases(bases, boxes[:0], torch.tensor([], dtype=torch.long), 4, 0.25).shape == (0, 2, 4, 4)


def test_attention_layer_size_and_config_checks():
    cfg = tiny_cfg()
    h = BlendMaskHead(cfg, SHAPES)
    assert h.top_layer.out_channels == 4 * 7 * 7 and h.top_module is h.top_layer
    cfg.MODEL.BLENDMASK.ATTN_SIZE = 14
    assert BlendMaskHead(cfg, SHAPES).top_layer.out_channels == 784
    cfg.MODEL.BLENDMASK.POOLER_SCALES = (0.125,)
    with pytest.raises(ValueError, match="POOLER_SCALES"):
        BlendMaskHead(cfg, SHAPES)


def _model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def test_training_losses_and_zero_instances():
    model = _model().train()
    model.mask_head.basis_module.loss_on = False
    losses = model([_input(2), _input(0)])
    assert 0 < losses["loss_mask"].item() < 5
    sum(losses.values()).backward()
    assert model.mask_head.top_layer.weight.grad.abs().sum() > 0
    assert model.mask_head.basis_module.tower[-1].weight.grad.abs().sum() > 0
    model.zero_grad()
    losses = model([_input(0), _input(0)])
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    sum(losses.values()).backward()


def test_inference_zero_and_some_detections():
    model = _model().eval()
    model.proposal_generator.score_thresh_test = 1.1
    with torch.no_grad():
        r = model([{"image": _input(0)["image"], "height": 32, "width": 48}])[0]["instances"]
    assert len(r) == 0 and r.pred_masks.shape[0] == 0
    model.proposal_generator.score_thresh_test = 0.0
    with torch.no_grad():
        r = model([{"image": _input(0)["image"], "height": 32, "width": 48}])[0]["instances"]
    assert len(r) > 0 and r.pred_masks.shape == (len(r), 32, 48) and r.pred_masks.dtype == torch.bool


def test_adelaidet_key_mapping_loads_strictly():
    model = _model()
    back = {"mask_head.basis_module.": "basis_module.", "mask_head.top_layer.": "top_layer."}
    adelai = {}
    for k, v in model.state_dict().items():
        for a, b in back.items():
            if k.startswith(a):
                k = b + k[len(a):]
        adelai[k] = v
    assert "top_layer.weight" in adelai and "basis_module.refine.0.0.weight" in adelai
    # tower: NUM_CONVS (1 here) conv blocks, Upsample, conv block, 1x1 conv
    assert "basis_module.tower.2.0.weight" in adelai and "basis_module.tower.3.weight" in adelai
    adelai["panoptic_module.predictor.weight"] = torch.zeros(1)
    model.load_state_dict(convert_adelaidet_blendmask(adelai), strict=True)


@pytest.mark.parametrize(
    "name,attn",
    [("R_50_1x", 14), ("R_50_3x", 14), ("R_101_1x", 14), ("R_101_3x", 14), ("550_R_50_1x", 14), ("550_R_50_3x", 14),
     ("blendmask_R18_shapes", 7)],
)
def test_configs_merge_and_build_the_head(name, attn):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(f"configs/BlendMask/{name}.yaml")
    assert cfg.MODEL.ONE_STAGE_MASK_HEAD.NAME == "BlendMaskHead"
    c = cfg.MODEL.FPN.OUT_CHANNELS
    shapes = {f"p{l}": ShapeSpec(channels=c, stride=2**l) for l in range(3, 8)}
    h = BlendMaskHead(cfg, shapes)
    assert h.top_layer.out_channels == 4 * attn * attn and h.bottom_resolution == 56
    assert h.basis_module.out_stride == 4


def test_inference_batch_of_different_image_sizes():
    model = _model().eval()
    model.proposal_generator.score_thresh_test = 0.0
    inputs = [{"image": torch.rand(3, 64, 64) * 255}, {"image": torch.rand(3, 48, 64) * 255, "height": 24, "width": 32}]
    with torch.no_grad():
        out = model(inputs)
    r0, r1 = out[0]["instances"], out[1]["instances"]
    assert len(r0) > 0 and r0.pred_masks.shape[1:] == (64, 64)
    assert len(r1) > 0 and r1.pred_masks.shape[1:] == (24, 32)


def test_blended_mask_loss_decreases_when_fitting_attentions():
    """Fixed bases (a left half and a right half of the box); learning only the
    attentions must pick the right basis per pixel: BCE falls well below its start."""
    S = 8
    rois = torch.zeros(1, 2, S, S)
    rois[0, 0, :, : S // 2] = 6.0
    rois[0, 0, :, S // 2:] = -6.0
    rois[0, 1] = -rois[0, 0]
    target = torch.zeros(1, S, S)
    target[0, : S // 2] = 1.0  # top half: needs basis 0 on the left, basis 1 on the right
    attns = torch.zeros(1, 2 * 4 * 4, requires_grad=True)
    opt = torch.optim.Adam([attns], lr=0.2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(blend(rois, attns, 4), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_painted_semantic_targets_last_instance_on_top_read_at_cell_corners():
    """MODEL.BASIS_MODULE.SEM_TARGETS "last_at_corners" (AdelaiDet's basis labels): instances
    painted in order, later on top, read at each cell's top-left pixel."""
    from d2seg.blendmask.basis_module import painted_semantic_targets

    m = torch.zeros(2, 8, 8)
    m[0] = 1  # class 3, everywhere
    m[1, 0:4, 4:8] = 1  # class 1, painted later: wins at (0, 4)
    m_small = m.clone()
    m_small[1, 1:4, 4:8] = 0  # only row 0 of the second: still read at the corner (0, 4)
    t = painted_semantic_targets([m, m_small], [torch.tensor([3, 1])] * 2, stride=4)
    assert t.tolist() == [[[4, 2], [4, 4]], [[4, 2], [4, 4]]]
    none = painted_semantic_targets([torch.zeros(0, 8, 8)], [torch.zeros(0, dtype=torch.long)], 4)
    assert none.tolist() == [[[0, 0], [0, 0]]]


def test_unclipped_boxes_are_decoded_from_the_regression():
    """MODEL.BLENDMASK.CROP_UNCLIPPED_BOXES: the box before clipping, from the detection's
    location, level and regressed distances."""
    from types import SimpleNamespace

    from detectron2.structures import Instances

    reg = [torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 1)]
    reg[0][0, :, 1, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # level 0, location index 2
    reg[1][0, :, 0, 0] = torch.tensor([2.0, 1.0, 0.5, 3.0])  # level 1, location index 4
    out = SimpleNamespace(bbox_reg=reg, strides=[8, 16])
    det = Instances((16, 16))
    det.loc_inds = torch.tensor([2, 4])
    det.fpn_levels = torch.tensor([0, 1])
    det.locations = torch.tensor([[4.0, 12.0], [8.0, 8.0]])
    boxes = BlendMaskHead._unclipped_boxes(out, 0, det)
    torch.testing.assert_close(boxes, torch.tensor([[4.0 - 8, 12.0 - 16, 4.0 + 24, 12.0 + 32],
                                                    [8.0 - 32, 8.0 - 16, 8.0 + 8, 8.0 + 48]]))
