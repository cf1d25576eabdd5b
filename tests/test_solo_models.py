"""SOLO, Decoupled SOLO and SOLOv2 built from their shapes configs: training losses with
and without instances, gradients, inference outputs, and a short overfit."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg

CONFIGS = {
    "SOLO": "configs/SOLO/solo_shapes.yaml",
    "DecoupledSOLO": "configs/SOLO/decoupled_solo_shapes.yaml",
    "SOLOv2": "configs/SOLO/solov2_shapes.yaml",
}


def _cfg(name):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(CONFIGS[name])
    return cfg


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg(name))


def _instances(rects, classes, size=(64, 64)):
    m = torch.zeros((len(rects),) + size, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(rects):
        m[k, y0:y1, x0:x1] = True
    inst = Instances(size)
    inst.gt_masks = BitMasks(m)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes() if len(rects) else Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 64, 64, generator=g) * 255  # 64 px keeps the tests fast


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_gradients_and_zero_instances(name):
    model = _model(name)
    assert type(model).__name__ == name
    model.train()
    batch = [
        {"image": _image(0), "instances": _instances([(5, 20, 10, 25), (30, 60, 30, 50)], [1, 3])},
        {"image": _image(1), "instances": _instances([], [])},
    ]
    losses = model(batch)
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < losses["loss_mask"].item() <= 3.0  # Dice in [0, 1], weight 3
    sum(losses.values()).backward()
    head = model.ins_head
    assert head.cate_pred.weight.grad.abs().sum() > 0
    mask_params = getattr(head, {"SOLO": "mask_pred", "DecoupledSOLO": "mask_pred_x",
                                 "SOLOv2": "kernel_pred"}[name])
    assert sum(p.grad.abs().sum() for p in mask_params.parameters() if p.grad is not None) > 0
    # a batch of images without any instance
    model.zero_grad()
    losses = model([batch[1], {"image": _image(2), "instances": _instances([], [])}])
    assert losses["loss_mask"].item() == 0.0 and torch.isfinite(losses["loss_cate"])
    sum(losses.values()).backward()
    assert head.cate_pred.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inference_outputs_and_zero_detections(name):
    model = _model(name)
    model.eval()
    model.inference_params.score_thr = 0.0  # every cell is a candidate
    model.inference_params.update_thr = 0.0  # (Matrix NMS) untrained scores are ~0.01
    model.inference_params.mask_thr = 0.3 if name == "DecoupledSOLO" else 0.5  # untrained X*Y ~ 0.25
    with torch.no_grad():
        out = model([{"image": _image(3), "height": 200, "width": 160}, {"image": _image(4)}])
    r0, r1 = out[0]["instances"], out[1]["instances"]
    assert r0.image_size == (200, 160) and r1.image_size == (64, 64)
    for r in (r0, r1):
        assert len(r) <= 100
        assert r.pred_masks.dtype == torch.bool and r.pred_masks.shape[1:] == r.image_size
        assert r.pred_boxes.tensor.shape == (len(r), 4)
        assert (r.scores[:-1] >= r.scores[1:]).all()
    assert len(r0) > 0
    model.inference_params.score_thr = 1.1  # nothing passes
    with torch.no_grad():
        r = model([{"image": _image(3), "height": 64, "width": 64}])[0]["instances"]
    assert len(r) == 0 and r.pred_masks.shape == (0, 64, 64) and r.pred_classes.dtype == torch.long


def test_decoupled_mask_is_product_of_x_and_y():
    model = _model("DecoupledSOLO")
    x = torch.randn(2, 6, 8, 8)
    y = torch.randn(2, 6, 8, 8)
    state = [None, None, None, None, (x, y)]
    cells = torch.tensor([0, 6 * 2 + 5, 35])
    imgs = torch.tensor([1, 0, 1])
    got = model.level_mask_probs(state, 4, imgs, cells)
    assert torch.allclose(got[1], x[0, 5].sigmoid() * y[0, 2].sigmoid())
    assert torch.allclose(got[2], x[1, 5].sigmoid() * y[1, 5].sigmoid())


def test_config_errors_name_the_key():
    cfg = _cfg("SOLO")
    cfg.MODEL.SOLO.NUM_GRIDS = [20, 16]
    with pytest.raises(ValueError, match="NUM_GRIDS"):
        build_model(cfg)
    cfg = _cfg("SOLO")
    cfg.MODEL.SOLO.NMS_TYPE = "soft"
    with pytest.raises(ValueError, match="NMS_TYPE"):
        build_model(cfg)


@pytest.mark.parametrize("name", [
    "SOLOv2",
    pytest.param("SOLO", marks=pytest.mark.slow),
    pytest.param("DecoupledSOLO", marks=pytest.mark.slow),
])
def test_short_overfit_reduces_loss(name):
    model = _model(name, seed=1)
    model.train()
    batch = [{"image": _image(5), "instances": _instances([(10, 26, 8, 24), (35, 59, 30, 58)], [0, 2])}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(8):
        losses = model(batch)
        total = sum(losses.values())
        first = first if first is not None else {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        total.backward()
        opt.step()
    last = {k: v.item() for k, v in model(batch).items()}
    assert last["loss_mask"] < 0.9 * first["loss_mask"]
    assert last["loss_cate"] < first["loss_cate"]
