"""PointRend's parts: point selection (training sampler, subdivision), point head, coarse
head, the mask head in training and inference (incl. no instances / empty boxes), the
cascade-training ROI heads, the semantic head, config errors and old checkpoint names."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg
from d2seg.pointrend import (
    D2SegPointRendMaskHead,
    D2SegPointRendSemSegHead,
    PointRendMLPPointHead,
    convert_upstream_state_dict,
    regular_grid_points,
    sample_training_points,
    subdivide,
    subdivision_steps_for,
    uncertain_points_on_grid,
)
from d2seg.pointrend.point_ops import point_sample
from d2seg.pointrend.subdivision import instance_uncertainty, semantic_uncertainty

K = 3  # classes
C = 8  # feature channels


# ----------------------------------------------------------------------------- selection
def test_regular_grid_is_cell_centres():
    g = regular_grid_points(2, 2, "cpu")
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    assert g.shape == (2, 4, 2)
    torch.testing.assert_close(g[1], expected)


def test_uncertain_points_on_grid_are_the_top_n_cells():
    torch.manual_seed(0)
    unc = torch.randn(4, 1, 6, 5)
    idx, coords = uncertain_points_on_grid(unc, 7)
    for r in range(4):
        expected = set(torch.argsort(unc[r].flatten(), descending=True)[:7].tolist())
        assert set(idx[r].tolist()) == expected
    # cell (row i, col j) has centre ((j + .5) / W, (i + .5) / H)
    i, j = idx // 5, idx % 5
    torch.testing.assert_close(coords[..., 0], (j.float() + 0.5) / 5)
    torch.testing.assert_close(coords[..., 1], (i.float() + 0.5) / 6)
    # asking for more points than cells gives every cell once
    idx, _ = uncertain_points_on_grid(unc, 1000)
    assert idx.shape == (4, 30) and all(len(set(r.tolist())) == 30 for r in idx)


def test_subdivision_updates_exactly_the_n_most_uncertain_cells():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 4, 4)
    n = 10
    sentinel = 1000.0
    seen = []

    def predict(coords):
        seen.append(coords.clone())
        return torch.full((coords.shape[0], 1, coords.shape[1]), sentinel)

    out = subdivide(logits, predict, 1, n, instance_uncertainty)
    up = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
    assert out.shape == (3, 1, 8, 8)
    changed = out != up
    assert (changed.flatten(1).sum(1) == n).all()
    assert torch.all(out[changed] == sentinel)  # changed cells got the new prediction
    for r in range(3):
        top = set(torch.argsort(up[r].abs().flatten())[:n].tolist())  # |logit| nearest 0
        assert set(torch.nonzero(changed[r].flatten()).flatten().tolist()) == top
    assert seen[0].shape == (3, n, 2)  # only N points are predicted per step


def test_subdivision_predicts_only_new_points_over_several_steps():
    logits = torch.randn(2, 2, 5, 5)
    counts = []

    def predict(coords):
        counts.append(coords.shape[1])
        return torch.zeros(coords.shape[0], 2, coords.shape[1])

    out = subdivide(logits, predict, 3, 50, semantic_uncertainty)
    assert out.shape == (2, 2, 40, 40)
    assert counts == [50, 50, 50]


def test_subdivision_skips_steps_that_would_recompute_everything():
    # 7x7 with N = 28^2: 14x14 and 28x28 grids fit in N, so start at 28x28 with 3 steps.
    assert subdivision_steps_for(7, 5, 28 * 28) == (28, 3)
    assert subdivision_steps_for(7, 5, 14 * 14) == (14, 4)
    assert subdivision_steps_for(7, 0, 28 * 28) == (7, 0)


def test_training_sampler_respects_k_and_beta():
    torch.manual_seed(0)
    R, N, k, beta = 5, 40, 3, 0.75
    coarse = torch.randn(R, 1, 7, 7)
    g = torch.Generator().manual_seed(123)
    pts = sample_training_points(coarse, instance_uncertainty, N, k, beta, generator=g)
    assert pts.shape == (R, N, 2)
    assert pts.min() >= 0 and pts.max() <= 1
    # replay the generator: the first beta*N points are the beta*N most uncertain of the
    # k*N candidates, the rest are fresh uniform points
    g = torch.Generator().manual_seed(123)
    cand = torch.rand(R, k * N, 2, generator=g)
    uniform = torch.rand(R, N - int(beta * N), 2, generator=g)
    unc = -point_sample(coarse, cand)[:, 0].abs()
    for r in range(R):
        top = torch.argsort(unc[r], descending=True)[: int(beta * N)]
        torch.testing.assert_close(pts[r, : int(beta * N)], cand[r, top])
    torch.testing.assert_close(pts[:, int(beta * N):], uniform)
    # the chosen candidates are more uncertain than the rejected ones
    chosen_unc = -point_sample(coarse, pts[:, : int(beta * N)])[:, 0].abs()
    assert (chosen_unc.min(1).values >= torch.sort(unc, 1, descending=True).values[:, int(beta * N)] - 1e-6).all()


def test_training_sampler_extremes_and_errors():
    coarse = torch.randn(2, 1, 7, 7)
    assert sample_training_points(coarse, instance_uncertainty, 10, 1, 0.0).shape == (2, 10, 2)
    assert sample_training_points(coarse, instance_uncertainty, 10, 10, 1.0).shape == (2, 10, 2)
    assert sample_training_points(coarse[:0], instance_uncertainty, 10, 3, 0.75).shape == (0, 10, 2)
    with pytest.raises(ValueError, match="OVERSAMPLE_RATIO"):
        sample_training_points(coarse, instance_uncertainty, 10, 0.5, 0.75)
    with pytest.raises(ValueError, match="IMPORTANCE_SAMPLE_RATIO"):
        sample_training_points(coarse, instance_uncertainty, 10, 3, 1.5)


# ----------------------------------------------------------------------------- heads
def _reference_mlp(head, fine, coarse):
    """The paper's point head written plainly: concatenate, conv1d, ReLU."""
    x = torch.cat((fine, coarse), 1)
    for fc in head.fc_layers:
        x = torch.cat((F.relu(fc(x)), coarse), 1)
    return head.predictor(x)


def test_point_head_shapes_and_values():
    torch.manual_seed(0)
    head = PointRendMLPPointHead(in_channels=C, num_classes=K, fc_dim=16, num_fc=3)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    R, P = 4, 11
    fine, coarse = torch.randn(R, C, P), torch.randn(R, K, P)
    out = head(fine, coarse)
    assert out.shape == (R, K, P)
    torch.testing.assert_close(out, _reference_mlp(head, fine, coarse), rtol=1e-5, atol=1e-5)
    classes = torch.tensor([2, 0, 1, 2])
    one = head(fine, coarse, classes)
    assert one.shape == (R, 1, P)
    torch.testing.assert_close(one[:, 0], out[torch.arange(R), classes], rtol=1e-5, atol=1e-5)
    # first layer applied to the map, then sampled == sampled, then first layer
    fmap = torch.randn(1, C, 9, 9)
    pts = torch.rand(1, R * P, 2)
    raw = point_sample(fmap, pts).view(C, R, P).transpose(0, 1)
    proj = point_sample(head.project_fine_features(fmap), pts).view(16, R, P).transpose(0, 1)
    torch.testing.assert_close(head(proj, coarse, fine_is_projected=True), head(raw, coarse),
                               rtol=1e-4, atol=1e-5)
    agnostic = PointRendMLPPointHead(in_channels=C, num_classes=K, fc_dim=16, num_fc=2, cls_agnostic=True)
    assert agnostic(fine, coarse).shape == (R, 1, P)
    first_only = PointRendMLPPointHead(in_channels=C, num_classes=K, fc_dim=16, num_fc=2,
                                       coarse_pred_each_layer=False)
    assert first_only.fc2.weight.shape[1] == 16 and first_only(fine, coarse).shape == (R, K, P)


def _cfg(**overrides):
    cfg = get_d2seg_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.POINTREND.COARSE_HEAD.FC_DIM = 32
    cfg.MODEL.POINTREND.POINT_HEAD.FC_DIM = 16
    cfg.MODEL.POINTREND.TRAIN_NUM_POINTS = 20
    for k, v in overrides.items():
        node = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return cfg


def _features(B=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"p2": torch.randn(B, C, size // 4, size // 4, generator=g)}


def _mask_head(cfg=None):
    cfg = cfg or _cfg()
    return D2SegPointRendMaskHead(cfg, {"p2": ShapeSpec(channels=C, stride=4)})


def _proposals(num, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((size, size))
    xy = torch.rand(num, 2, generator=g) * size / 2
    wh = torch.rand(num, 2, generator=g) * size / 2 + 4
    boxes = torch.cat((xy, xy + wh), 1)
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, K, (num,), generator=g)
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    for i, b in enumerate(boxes.round().long()):
        masks[i, b[1]:b[3], b[0]:b[2]] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def test_coarse_head_output_shape():
    head = _mask_head()
    feats = _features()
    inst = [_proposals(5), _proposals(2, seed=1)]
    pooled = head.pool_regions(feats, [x.proposal_boxes for x in inst])
    assert pooled.shape == (7, C, 14, 14)
    assert head.coarse_head(pooled).shape == (7, K, 7, 7)


def test_pool_regions_matches_bilinear_by_hand():
    head = _mask_head()
    fmap = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(1, C, 1, 1)
    boxes = [Boxes(torch.tensor([[8.0, 16.0, 36.0, 44.0]]))]
    pooled = head.pool_regions({"p2": fmap}, boxes)
    # cell centre (i, j) of the 14x14 grid: x = 8 + (j + .5) * 2, y = 16 + (i + .5) * 2
    # pixels; on the stride-4 map (align_corners=False) that is u = x / 4 - .5. The map
    # is linear (16 * v + u), so bilinear sampling returns exactly that.
    j = torch.arange(14, dtype=torch.float32)
    u = (8 + (j + 0.5) * 2) / 4 - 0.5
    v = (16 + (j + 0.5) * 2) / 4 - 0.5
    expected = 16 * v[:, None] + u[None, :]
    torch.testing.assert_close(pooled[0, 0], expected, rtol=0, atol=1e-4)


def test_mask_head_training_losses_and_gradients():
    torch.manual_seed(0)
    head = _mask_head().train()
    inst = [_proposals(5), _proposals(3, seed=1)]
    with EventStorage():
        losses = head(_features(), inst)
    assert set(losses) == {"loss_mask", "loss_mask_point"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert head.point_head.fc1.weight.grad.abs().sum() > 0
    assert head.coarse_head.fc1.weight.grad.abs().sum() > 0


def test_mask_head_training_with_no_instances():
    head = _mask_head().train()
    inst = [_proposals(0), _proposals(0, seed=1)]
    with EventStorage():
        losses = head(_features(), inst)
    assert all(float(v) == 0.0 for v in losses.values())
    sum(losses.values()).backward()  # graph exists even without regions
    inst = [_proposals(0), _proposals(2, seed=1)]  # one image empty, the other not
    with EventStorage():
        losses = head(_features(), inst)
    assert losses["loss_mask_point"] > 0


def test_point_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    head = _mask_head().train()
    feats = _features(seed=3)
    inst = [_proposals(4, seed=3), _proposals(3, seed=4)]
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    hist = []
    with EventStorage():
        for _ in range(25):
            losses = head(feats, inst)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            hist.append(float(losses["loss_mask_point"]))
    assert sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5


def _detections(num, size=64, seed=0, empty=False):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((size, size))
    xy = torch.rand(num, 2, generator=g) * size / 2
    wh = torch.zeros(num, 2) if empty else torch.rand(num, 2, generator=g) * size / 2 + 4
    inst.pred_boxes = Boxes(torch.cat((xy, xy + wh), 1))
    inst.pred_classes = torch.randint(0, K, (num,), generator=g)
    inst.scores = torch.rand(num, generator=g)
    return inst


@pytest.mark.parametrize("project", ["never", "always"])
def test_mask_head_inference_shapes_and_projection_equivalence(project):
    torch.manual_seed(0)
    cfg = _cfg(MODEL__POINTREND__PROJECT_FINE_FEATURES=project)
    head = _mask_head(cfg).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    feats = _features()
    dets = [_detections(4), _detections(2, seed=1)]
    with torch.no_grad():
        out = head(feats, dets)
    assert [x.pred_masks.shape for x in out] == [(4, 1, 224, 224), (2, 1, 224, 224)]
    assert all(((x.pred_masks >= 0) & (x.pred_masks <= 1)).all() for x in out)
    # the same masks whichever way the first layer is computed
    other = _mask_head(_cfg(MODEL__POINTREND__PROJECT_FINE_FEATURES="never")).eval()
    other.load_state_dict(head.state_dict())
    with torch.no_grad():
        ref = other(feats, [_detections(4), _detections(2, seed=1)])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=1e-5)


def test_mask_head_inference_zero_detections_and_empty_boxes():
    head = _mask_head().eval()
    with torch.no_grad():
        out = head(_features(), [_detections(0), _detections(0, seed=1)])
        assert [x.pred_masks.shape for x in out] == [(0, 1, 224, 224)] * 2
        out = head(_features(), [_detections(0), _detections(3, seed=1, empty=True)])
    assert out[1].pred_masks.shape == (3, 1, 224, 224)
    assert torch.isfinite(out[1].pred_masks).all()


def test_coarse_only_mode_and_config_errors():
    head = _mask_head(_cfg(MODEL__POINTREND__POINT_HEAD_ON=False)).eval()
    assert head.point_head is None
    with torch.no_grad():
        out = head(_features(), [_detections(2), _detections(1, seed=1)])
    assert out[0].pred_masks.shape == (2, 1, 7, 7)
    with pytest.raises(ValueError, match="MODEL.POINTREND.IN_FEATURES"):
        _mask_head(_cfg(MODEL__POINTREND__IN_FEATURES=("p3",)))
    with pytest.raises(ValueError, match="POOLER_TYPE"):
        D2SegPointRendMaskHead(_cfg(), ShapeSpec(channels=C, height=14, width=14))
    with pytest.raises(KeyError, match="POINT_HEAD.NAME"):
        _mask_head(_cfg(MODEL__POINTREND__POINT_HEAD__NAME="StandardPointHead"))
    with pytest.raises(ValueError, match="PROJECT_FINE_FEATURES"):
        _mask_head(_cfg(MODEL__POINTREND__PROJECT_FINE_FEATURES="sometimes"))
    with pytest.raises(TypeError, match="MASK_FORMAT"):
        inst = _proposals(2)
        inst.gt_masks = __import__("detectron2.structures", fromlist=["PolygonMasks"]).PolygonMasks(
            [[[0.0, 0.0, 5.0, 0.0, 5.0, 5.0]]] * 2)
        with EventStorage():
            _mask_head().train()(_features(B=1), [inst])


# ----------------------------------------------------------------------------- model level
def _rcnn_cfg(**kw):
    cfg = _cfg(**kw)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME = "D2SegPointRendROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.NAME = "D2SegPointRendMaskHead"
    return cfg


def _batch(with_objects=True):
    inst = _proposals(2 if with_objects else 0)
    gt = Instances((64, 64), gt_boxes=inst.proposal_boxes, gt_classes=inst.gt_classes, gt_masks=inst.gt_masks)
    return [{"image": torch.rand(3, 64, 64) * 255, "instances": gt}]


@pytest.mark.parametrize("cascade", [False, True])
def test_rcnn_training_step_with_and_without_cascade(cascade, monkeypatch):
    torch.manual_seed(0)
    model = build_model(_rcnn_cfg(MODEL__POINTREND__CASCADE_TRAINING=cascade)).train()
    assert model.roi_heads.train_on_pred_boxes == cascade
    seen = {}
    orig = model.roi_heads.mask_head.forward

    def spy(features, instances):
        seen["boxes"] = [x.proposal_boxes.tensor.clone() for x in instances]
        return orig(features, instances)

    monkeypatch.setattr(model.roi_heads.mask_head, "forward", spy)
    with EventStorage():
        losses = model(_batch())
        sum(losses.values()).backward()
        assert {"loss_mask", "loss_mask_point"} <= set(losses)
        losses = model(_batch(with_objects=False))  # an image without objects
        assert float(losses["loss_mask_point"]) == 0.0
    if cascade:  # regressed boxes are kept inside the image
        b = seen["boxes"][0]
        assert b.numel() == 0 or (b.min() >= 0 and b.max() <= 64)


def test_old_checkpoint_names_are_converted_on_load():
    model = build_model(_rcnn_cfg())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    old = {}
    for k, v in sd.items():
        k = k.replace("roi_heads.mask_head.point_head.", "roi_heads.mask_point_head.")
        k = k.replace("roi_heads.mask_head.coarse_head.fc", "roi_heads.mask_coarse_head.coarse_mask_fc")
        k = k.replace("roi_heads.mask_head.coarse_head.", "roi_heads.mask_coarse_head.")
        old[k] = v + 1.0 if v.is_floating_point() else v
    assert "roi_heads.mask_coarse_head.coarse_mask_fc1.weight" in old
    assert set(convert_upstream_state_dict(old)) == set(sd)
    model.load_state_dict(old, strict=True)
    torch.testing.assert_close(model.roi_heads.mask_head.point_head.fc1.weight,
                               sd["roi_heads.mask_head.point_head.fc1.weight"] + 1.0)


# ----------------------------------------------------------------------------- semantic
def _sem_cfg():
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "D2SegPointRendSemSegHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    cfg.MODEL.POINTREND.SEM_SEG.TRAIN_NUM_POINTS = 64
    cfg.MODEL.POINTREND.SEM_SEG.SUBDIVISION_NUM_POINTS = 100
    return cfg


def test_semantic_head_training_and_inference_to_input_resolution():
    torch.manual_seed(0)
    shapes = {"p2": ShapeSpec(channels=C, stride=4), "p3": ShapeSpec(channels=C, stride=8)}
    head = D2SegPointRendSemSegHead(_sem_cfg(), shapes)
    feats = {"p2": torch.randn(2, C, 16, 24), "p3": torch.randn(2, C, 8, 12)}
    targets = torch.randint(0, K, (2, 64, 96))
    targets[:, :4] = 255  # ignored
    head.train()
    _, losses = head(feats, targets)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_point"}
    sum(losses.values()).backward()
    assert head.point_head.fc1.weight.grad.abs().sum() > 0
    head.eval()
    calls = []
    orig = head.point_head.forward

    def count(fine, coarse, *a, **k):
        calls.append(fine.shape[-1])
        return orig(fine, coarse, *a, **k)

    head.point_head.forward = count
    with torch.no_grad():
        logits, _ = head(feats)
    assert logits.shape == (2, K, 64, 96)  # stride 4 -> 2 steps -> input resolution
    assert calls == [100, 100]



def test_semantic_head_on_deeplabv3():
    torch.manual_seed(0)
    cfg = _sem_cfg()
    cfg.MODEL.POINTREND.SEM_SEG.COARSE_HEAD_NAME = "DeepLabV3Head"
    cfg.MODEL.POINTREND.IN_FEATURES = ("res2",)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 16
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 16
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    cfg.INPUT.CROP.ENABLED = False
    shapes = {"res2": ShapeSpec(channels=C, stride=4), "res5": ShapeSpec(channels=C, stride=16)}
    head = D2SegPointRendSemSegHead(cfg, shapes)
    feats = {"res2": torch.randn(1, C, 16, 16), "res5": torch.randn(1, C, 4, 4)}
    head.train()
    _, losses = head(feats, torch.randint(0, K, (1, 64, 64)))
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_point"}
    head.eval()
    with torch.no_grad():
        logits, _ = head(feats)
    assert logits.shape == (1, K, 64, 64)  # stride 16 -> 4 steps


def test_every_pointrend_config_merges():
    import glob
    import os

    from d2seg.engine import setup_cfg

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "PointRend")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(files) >= 15
    for f in files:
        cfg = setup_cfg(f, [], freeze=False)
        if "Semantic" in f or "semantic" in f:
            assert cfg.MODEL.SEM_SEG_HEAD.NAME == "D2SegPointRendSemSegHead"
        elif "sparseinst" in f:
            assert cfg.MODEL.META_ARCHITECTURE == "D2SegPointRendSparseInst"
        else:
            assert cfg.MODEL.ROI_MASK_HEAD.NAME == "D2SegPointRendMaskHead"
    shapes = setup_cfg(os.path.join(root, "pointrend_rcnn_R18_shapes.yaml"), [], freeze=False)
    model = build_model(shapes)
    assert type(model.roi_heads.mask_head).__name__ == "D2SegPointRendMaskHead"


# ----------------------------------------------------------------------------- plug-in refiner
def test_refiner_on_sparseinst_trains_and_refines(monkeypatch):
    import os

    from d2seg.engine import setup_cfg
    from d2seg.pointrend.refine import masks_to_boxes_xyxy

    pytest.importorskip("d2seg.sparseinst")
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "PointRend")
    cfg = setup_cfg(os.path.join(root, "pointrend_sparseinst_r18_giam_shapes.yaml"),
                    ["MODEL.SPARSE_INST.DECODER.NUM_MASKS", "8", "MODEL.SPARSE_INST.CLS_THRESHOLD", "0.0"],
                    freeze=False)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    inst = _proposals(2)
    gt = Instances((64, 64), gt_boxes=inst.proposal_boxes, gt_classes=inst.gt_classes, gt_masks=inst.gt_masks)
    empty = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long),
                      gt_masks=BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool)))
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": gt},
             {"image": torch.rand(3, 64, 64) * 255, "instances": empty}]
    with EventStorage():
        losses = model(batch)
    assert losses["loss_mask_point_refine"] > 0 and "loss_dice" in losses
    sum(losses.values()).backward()
    assert model.refiner.point_head.fc1.weight.grad.abs().sum() > 0
    # inference: every kept mask is refined from 16x16 to 64x64 (2 steps), N points each
    model.eval()
    steps = []
    orig = model.refiner.point_head.forward

    def count(fine, coarse, *a, **k):
        steps.append(fine.shape)
        return orig(fine, coarse, *a, **k)

    monkeypatch.setattr(model.refiner.point_head, "forward", count)
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    assert out[0]["instances"].pred_masks.shape[-2:] == (64, 64)
    assert len(steps) == 2 and steps[0][-1] == 196 and steps[0][1] == 64  # res2 of R-18: 64 ch
    # ground-truth boxes for the sampler: tight box scaled about its centre, clipped
    m = torch.zeros(1, 10, 10)
    m[0, 2:6, 4:8] = 1
    torch.testing.assert_close(masks_to_boxes_xyxy(m, 1.0), torch.tensor([[4.0, 2.0, 8.0, 6.0]]))
    torch.testing.assert_close(masks_to_boxes_xyxy(m, 2.0), torch.tensor([[2.0, 0.0, 10.0, 8.0]]))


def test_refiner_only_repredicts_inside_the_scaled_box_of_the_coarse_mask():
    """Inference mirrors training: the point head only re-predicts points inside the
    BOX_SCALE-scaled box of the detector's own mask; an empty coarse mask stays empty."""
    from torch import nn

    from d2seg.pointrend.refine import PointRendMaskRefiner

    class AlwaysPositive(nn.Module):  # a point head whose every prediction is "foreground"
        def forward(self, fine, coarse):
            return torch.full_like(coarse, 10.0)

    refiner = PointRendMaskRefiner(point_head=AlwaysPositive(), in_features=["res2"],
                                   subdivision_num_points=10_000, subdivision_steps=2, box_scale=1.0)
    logits = torch.full((1, 2, 8, 8), -5.0)
    logits[0, 0, 1:3, 1:3] = 5.0  # instance 0: a 2x2 blob; instance 1: empty
    out = refiner.refine({"res2": torch.rand(1, 4, 8, 8)}, logits, torch.ones(1, 2, dtype=torch.bool), (32, 32))
    assert out.shape == (1, 2, 32, 32)
    fg = out[0, 0] > 0
    ys, xs = torch.nonzero(fg, as_tuple=True)
    # the blob covers cells 1..2 of 8, i.e. pixels [4, 12) of 32: nothing positive outside it
    assert fg.any() and ys.min() >= 4 and ys.max() < 12 and xs.min() >= 4 and xs.max() < 12
    assert fg[4:12, 4:12].all()  # and the head's "foreground" fills the box
    assert not (out[0, 1] > 0).any()


# ----------------------------------------------------------------------------- semantic, end to end
def test_semantic_shapes_config_trains_and_reports_miou(tmp_path):
    """tools/train_net.py on the semantic shapes config: a few iterations on the semantic form
    of the built-in data set, then Detectron2's SemSegEvaluator on shapes_sem_seg_val."""
    import os
    import re
    import subprocess
    import sys

    from conftest import CONFIGS, TOOLS, tiny_opts

    cfg = os.path.join(CONFIGS, "PointRend", "pointrend_semantic_R18_shapes.yaml")
    res = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", cfg]
        + tiny_opts(tmp_path, max_iter=4, SOLVER__CHECKPOINT_PERIOD=1000,
                    MODEL__POINTREND__SEM_SEG__TRAIN_NUM_POINTS=256,
                    MODEL__POINTREND__SEM_SEG__SUBDIVISION_NUM_POINTS=256),
        capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "loss_sem_seg_point" in log
    m = re.search(r"copypaste: mIoU,fwIoU,mACC,pACC\n.*copypaste: ([0-9.]+),", log)
    assert m, log[-3000:]
    # four iterations learn nothing (the mIoU bar is in tests/test_learning.py): the
    # evaluator ran on the semantic data and reported every class of it
    assert len(set(re.findall(r"IoU-(\w+)", log))) == 6, log[-3000:]
    assert (tmp_path / "model_final.pth").exists()
