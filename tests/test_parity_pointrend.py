"""Parity with Detectron2's PointRend project (fixtures tests/data/reference/
pointrend_instance.pt and pointrend_semantic.pt, written by ``dev/reference/reference_fixtures.py
--reference pointrend-instance|pointrend-semantic``: Detectron2's models narrowed, random
weights, two small images with ground truth).

The reference's state dict, converted by d2seg's converter, is loaded into d2seg's model built
from the shipped config (``pointrend_rcnn_R_50_FPN_1x_coco.yaml``,
``pointrend_semantic_R_50_FPN_1x_cityscapes.yaml``) with only the fixture's width overrides,
and must reproduce: box predictor outputs and coarse mask logits, or the coarse semantic
logits (eval); the final results; every training loss with the same random draws (the
fixture's ``train_seed`` is set before the training forward on both sides: RPN / ROI
subsampling and the random point selection then draw the same numbers). The reference is not
needed.
"""
import pytest
import torch
from parity_common import batch, converted_model, load_fixture

# the fixtures were computed with one thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tol(ref):
    return max(1e-4, 1e-5 * float(ref.abs().max()))


def _build(name):
    torch.set_num_threads(1)
    fx = load_fixture(name)
    # no training data set: the narrowed class count need not match COCO's / Cityscapes'
    cfg, model = converted_model(fx, "pointrend-upstream", ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    return fx, cfg, model


def _losses(fx, model):
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0), torch.no_grad():
        torch.manual_seed(fx["train_extra"]["train_seed"])
        return {k: float(v) for k, v in model(batch(fx)).items()}


def _check_losses(fx, losses):
    assert set(losses) == set(fx["losses"])
    for k, ref in fx["losses"].items():
        assert abs(losses[k] - float(ref)) <= 1e-4 * abs(float(ref)), f"{k}: {losses[k]} vs {float(ref)}"


@pytest.fixture(scope="module")
def instance():
    return _build("pointrend_instance.pt")


@pytest.fixture(scope="module")
def semantic():
    return _build("pointrend_semantic.pt")


def test_instance_config_takes_detectron2_training_conventions(instance):
    fx, cfg, _ = instance
    assert fx["repo"] == "facebookresearch/detectron2" and len(fx["commit"]) == 40
    assert cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES and not cfg.MODEL.POINTREND.CLIP_TRAIN_BOXES


def test_instance_outputs_and_results(instance):
    fx, _, model = instance
    head = {}

    def box_hook(_m, _i, out):
        head["box_scores"], head["box_deltas"] = out[0].detach(), out[1].detach()

    hooks = [model.roi_heads.box_predictor.register_forward_hook(box_hook),
             model.roi_heads.mask_head.coarse_head.register_forward_hook(
                 lambda _m, _i, out: head.__setitem__("coarse_mask", out.detach()))]
    model.eval()
    with torch.no_grad():
        results = model(batch(fx))
    for h in hooks:
        h.remove()
    for k, ref in fx["outputs"]["head"].items():
        diff = float((head[k] - ref).abs().max())
        assert diff <= _tol(ref), f"{k}: max abs diff {diff}"
    for r, ref in zip(results, fx["outputs"]["results"]):
        inst = r["instances"]
        assert len(inst) == len(ref["scores"]) > 0
        assert torch.equal(inst.pred_classes, ref["pred_classes"])
        assert float((inst.scores - ref["scores"]).abs().max()) <= 1e-4
        assert float((inst.pred_boxes.tensor - ref["pred_boxes"]).abs().max()) <= 1e-2
        pm, rm = inst.pred_masks, ref["pred_masks"]
        inter = (pm & rm).flatten(1).sum(1).float()
        union = (pm | rm).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert float(iou.min()) >= 0.999


def test_instance_training_losses(instance):
    fx, _, model = instance
    _check_losses(fx, _losses(fx, model))


def test_semantic_config_loads_detectron2_checkpoints(semantic):
    fx, cfg, _ = semantic
    assert not cfg.MODEL.POINTREND.POINT_HEAD.COARSE_PRED_EACH_LAYER
    assert cfg.MODEL.POINTREND.SEM_SEG.SUBDIVISION_NUM_POINTS == 8192
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0


def test_semantic_outputs_and_results(semantic):
    fx, _, model = semantic
    head = {}
    h = model.sem_seg_head.coarse_sem_seg_head.predictor.register_forward_hook(
        lambda _m, _i, out: head.__setitem__("coarse_sem_seg", out.detach()))
    model.eval()
    with torch.no_grad():
        results = model(batch(fx))
    h.remove()
    for k, ref in fx["outputs"]["head"].items():
        diff = float((head[k] - ref).abs().max())
        assert diff <= _tol(ref), f"{k}: max abs diff {diff}"
    for r, ref in zip(results, fx["outputs"]["results"]):
        logits = r["sem_seg"]
        top2 = logits.topk(2, dim=0).values
        assert float((top2[0] - top2[1] - ref["sem_seg_margin"]).abs().max()) <= _tol(top2[0])
        differ = logits.argmax(0).to(torch.uint8) != ref["sem_seg_argmax"]
        # argmax equal except at exact ties (within float rounding of each other)
        assert float(ref["sem_seg_margin"][differ].abs().max().nan_to_num(0) if differ.any() else 0) <= 1e-4


def test_semantic_training_losses(semantic):
    fx, _, model = semantic
    _check_losses(fx, _losses(fx, model))
