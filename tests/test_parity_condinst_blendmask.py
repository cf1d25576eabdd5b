"""Parity of CondInst and BlendMask with aim-uofa/AdelaiDet from golden fixtures
(tests/data/reference/adelaidet_condinst.pt, adelaidet_blendmask.pt).

Each fixture was written by ``dev/reference/reference_fixtures.py --reference condinst|blendmask`` from
AdelaiDet's own code (its MS_R_50_1x / R_50_1x configs, narrow widths, random weights; see
dev/reference/reference_condinst_blendmask.py). Here, without AdelaiDet installed, the reference's
state dict is converted by d2seg's converter, loaded strictly into d2seg's model built from
the shipped COCO config (configs/CondInst/R_50_1x.yaml, configs/BlendMask/R_50_1x.yaml) with
only the fixture's width overrides, and compared on the fixture's images:

* head outputs (eval): max abs diff <= max(1e-4, 1e-5 * largest magnitude);
* final results: same number of detections and classes, scores within 1e-4, boxes within
  1e-2 px, mask IoU >= 0.999 per detection;
* every training loss term on the same batch: relative 1e-4.

Head-output names. Both: FCOS's per-level ``logits``, ``bbox_reg`` (/ stride, after ReLU),
``ctrness``. CondInst: ``mask_feats`` (mask branch, stride 8), ``params`` (R, 169) the
controller's output at the detections of the batch in order, ``mask_logits`` (R, 1, H/4, W/4)
the dynamic head's output for them. BlendMask: ``bases`` (N, 4, H/4, W/4), ``mask_logits`` (R, 56, 56)
the blended logits of the detections of the batch in order. ``train_extra`` (CondInst): ``num_pos`` (positives of the shipped config),
``topk`` / ``losses_topk`` (losses with MAX_PROPOSALS -1 and TOPK_PROPOSALS_PER_IM topk: the
selection is deterministic, so no randomness needs controlling), ``sem_config``,
``sem_weights`` / ``losses_sem`` (the "w/ sem." configs: the semantic head's weights and the
losses with it); ``max_sampled``, ``sampled`` (im_inds, fpn_levels, locations of the
positives AdelaiDet's random subsample kept) and ``losses_sampled`` (MAX_PROPOSALS
max_sampled). The shipped MAX_PROPOSALS (500) samples nothing on the fixture.
"""
import os

import pytest
import torch

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg
from d2seg.model_zoo import convert_state_dict
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

# the fixtures were computed with one thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import load_script  # noqa: E402
from parity_common import DATA, ROOT, batch, load_fixture  # noqa: E402,F401


# ----------------------------------------------------------------------------- helpers
# (fixture loading and batches: tests/parity_common.py)


def make_cfg(fx, opts=()):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, fx["d2seg_config"]))
    cfg.merge_from_list(list(fx["d2seg_opts"]))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def build_d2seg(fx, opts=(), config=None, extra_weights=None):
    """d2seg's model from the shipped config (``config``, default the fixture's) and the
    fixture's width overrides (``opts``: only for the tests that switch a convention or a
    training option on purpose), with the reference's weights (plus ``extra_weights``)
    converted and loaded strictly."""
    cfg = make_cfg(dict(fx, d2seg_config=config or fx["d2seg_config"]), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = dict(fx["weights"], **(extra_weights or {}))
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    result = convert_state_dict(weights, source="adelaidet", target_keys=model.state_dict().keys())
    model.load_state_dict(result.state_dict, strict=True)
    return model


def max_diff(ours, ref):
    return (ours - ref).abs().max().item() if ref.numel() else 0.0


def assert_close_output(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    tol = max(1e-4, 1e-5 * ref.abs().max().item()) if ref.numel() else 1e-4
    diff = max_diff(ours, ref)
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def mask_ious(ours, ref):
    a, b = ours.bool().flatten(1), ref.bool().flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# Mask pixels whose probability lies within this distance of the threshold may fall on either
# side of it from one CPU to another (or one thread count to another): the convolutions sum
# in another order, and the fixtures' random weights put a few pixels within float rounding
# of 0.5 (BlendMask's fixture with two threads: mask IoU 0.9846 on one detection, its 7
# differing pixels within 3e-8 of the threshold; on CI's CPU once 0.9825 with one thread).
ROUNDING_BAND = 1e-3


def assert_same_results(ours, ref, soft_masks=None, threshold=0.5):
    """``soft_masks`` (optional): per image, d2seg's mask probabilities at the output size,
    from which its ``pred_masks`` were thresholded; with them, a detection whose mask IoU is
    under 0.999 passes only when every pixel where the masks differ lies within
    ``ROUNDING_BAND`` of the threshold (and at most 5 % of the union differs)."""
    for i, (o, r) in enumerate(zip(ours, ref)):
        o = o["instances"]
        assert len(o) == len(r["scores"]), f"image {i}: {len(o)} vs {len(r['scores'])} detections"
        assert torch.equal(o.pred_classes.long(), r["pred_classes"]), f"image {i}: classes"
        assert max_diff(o.scores, r["scores"]) <= 1e-4, f"image {i}: scores"
        assert max_diff(o.pred_boxes.tensor, r["pred_boxes"]) <= 1e-2, f"image {i}: boxes"
        iou = mask_ious(o.pred_masks, r["pred_masks"])
        for j in range(iou.numel()):
            if iou[j] >= 0.999:
                continue
            assert soft_masks is not None, f"image {i}: mask IoU {iou[j].item():.4f} (detection {j})"
            soft = soft_masks[i][j]
            assert torch.equal(soft >= threshold, o.pred_masks[j].bool()), "soft masks are not d2seg's"
            differ = o.pred_masks[j].bool() != r["pred_masks"][j].bool()
            union = (o.pred_masks[j].bool() | r["pred_masks"][j].bool()).sum().item()
            off = (soft[differ] - threshold).abs().max().item()
            assert off <= ROUNDING_BAND and differ.sum().item() <= 0.05 * union, (
                f"image {i}: mask IoU {iou[j].item():.4f} (detection {j}): {differ.sum().item()} "
                f"pixels differ, up to {off:.2g} from the threshold")


def assert_same_losses(ours, ref):
    assert set(ours) == set(ref), f"loss terms {sorted(ours)} vs reference {sorted(ref)}"
    for k, v in ref.items():
        rel = (ours[k].detach() - v).abs().item() / max(abs(v.item()), 1e-12)
        assert rel <= 1e-4, f"{k}: {ours[k].item():.6f} vs reference {v.item():.6f} (rel {rel:.2e})"


def run_eval(model, fx):
    model.eval()
    with torch.no_grad():
        return model(batch(fx))


def run_train(model, fx):
    model.train()
    with EventStorage():
        return model(batch(fx))


def capture_head(model, fx, mask_head_method, store):
    """Eval run recording FCOS's head outputs and, via ``mask_head_method`` (a wrapper
    factory), the mask head's."""
    seen = {}
    hooks = [model.proposal_generator.fcos_head.register_forward_hook(lambda m, a, out: seen.update(fcos=out))]
    mh = model.mask_head
    name, wrapper = mask_head_method
    orig = getattr(mh, name)
    setattr(mh, name, wrapper(orig, store))
    try:
        results = run_eval(model, fx)
    finally:
        delattr(mh, name)
        for h in hooks:
            h.remove()
    return seen["fcos"], results


def assert_fcos_outputs(model, out, ref):
    for lvl in range(len(model.proposal_generator.strides)):
        assert_close_output(out.logits[lvl], ref["logits"][lvl], f"logits P{lvl + 3}")
        assert_close_output(out.ctrness[lvl], ref["ctrness"][lvl], f"ctrness P{lvl + 3}")
        assert_close_output(out.bbox_reg[lvl], ref["bbox_reg"][lvl], f"bbox_reg P{lvl + 3}")


# ----------------------------------------------------------------------------- CondInst


@pytest.fixture(scope="module")
def condinst():
    fx = load_fixture("adelaidet_condinst.pt")
    return fx, build_d2seg(fx)


def test_condinst_converter_drops_adelaidet_buffers(condinst, tmp_path):
    """Every AdelaiDet CondInst checkpoint holds ``mask_head.sizes_of_interest`` (and
    ``mask_head._iter``): recomputed here, so dropped; tools/convert_checkpoint.py succeeds."""
    fx, model = condinst
    assert "mask_head.sizes_of_interest" in fx["weights"]
    result = convert_state_dict(fx["weights"], source="adelaidet", target_keys=model.state_dict().keys())
    assert "mask_head.sizes_of_interest" in result.dropped
    assert not any(k.startswith("mask_head.sizes") for k in result.state_dict)
    # the buffer holds what d2seg recomputes from the config
    assert torch.equal(model.mask_head.sizes_of_interest, fx["weights"]["mask_head.sizes_of_interest"].float())

    convert_checkpoint = load_script("tools/convert_checkpoint.py")

    src, dst = tmp_path / "adelaidet.pth", tmp_path / "d2seg.pth"
    torch.save({"model": {k: v.float() if v.is_floating_point() else v for k, v in fx["weights"].items()}}, src)
    rc = convert_checkpoint.main(["--from", "adelaidet", "--config-file", os.path.join(ROOT, fx["d2seg_config"]),
                                  str(src), str(dst)] + [str(x) for x in fx["d2seg_opts"]])
    assert rc in (0, None) and dst.is_file()
    model.load_state_dict(torch.load(dst, weights_only=True)["model"], strict=True)


def _condinst_capture(orig, store):
    def mask_logits(mask_feats, instances, im_inds):
        out = orig(mask_feats, instances, im_inds)
        store["mask_feats"] = mask_feats.detach().clone()
        store["params"] = instances.top_feats.detach().clone()
        store["mask_logits"] = out.detach().clone()
        return out
    return mask_logits


def test_condinst_head_outputs(condinst):
    fx, model = condinst
    store = {}
    out, _ = capture_head(model, fx, ("mask_logits", _condinst_capture), store)
    ref = fx["outputs"]["head"]
    assert_fcos_outputs(model, out, ref)
    assert_close_output(store["mask_feats"], ref["mask_feats"], "mask_feats")
    assert_close_output(store["params"], ref["params"], "controller params of the detections")
    assert_close_output(store["mask_logits"], ref["mask_logits"], "dynamic head mask logits")


def test_condinst_results(condinst):
    fx, model = condinst
    ref = fx["outputs"]["results"]
    # boxes leave the image; masks are neither all empty nor all full
    assert any((r["pred_boxes"] == 0).any() for r in ref)
    fill = torch.cat([r["pred_masks"].float().mean((1, 2)) for r in ref])
    assert ((fill > 0.01) & (fill < 0.99)).sum() >= 5
    assert_same_results(run_eval(model, fx), ref)


def _num_positives(model, fx, opts=()):
    seen = {}
    h = model.proposal_generator.register_forward_hook(lambda m, a, out: seen.update(n=len(out.positives)))
    losses = run_train(model, fx)
    h.remove()
    return seen["n"], losses


def test_condinst_losses_and_positives(condinst):
    fx, model = condinst
    n, losses = _num_positives(model, fx)
    assert n == fx["train_extra"]["num_pos"]
    assert_same_losses(losses, fx["losses"])


def test_condinst_topk_proposals_per_image_losses(condinst):
    """TOPK_PROPOSALS_PER_IM as AdelaiDet: the image's quota split over its objects."""
    fx, _ = condinst
    k = fx["train_extra"]["topk"]
    model = build_d2seg(fx, ["MODEL.CONDINST.MAX_PROPOSALS", -1, "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM", k])
    losses = run_train(model, fx)
    assert_same_losses(losses, fx["train_extra"]["losses_topk"])
    assert abs(losses["loss_mask"].item() - fx["losses"]["loss_mask"].item()) > 1e-3  # the quota bites


def test_condinst_max_proposals_subsample_losses(condinst, monkeypatch):
    """MAX_PROPOSALS below the number of positives: a random subset gets the mask loss. With
    the randomness controlled (d2seg's permutation puts the positives AdelaiDet kept first),
    the losses are equal."""
    fx, _ = condinst
    extra = fx["train_extra"]
    k, kept = extra["max_sampled"], extra["sampled"]
    model = build_d2seg(fx, ["MODEL.CONDINST.MAX_PROPOSALS", k])
    seen = {}
    h = model.proposal_generator.register_forward_hook(lambda m, a, out: seen.update(pos=out.positives))
    randperm = torch.randperm

    def controlled(n, **kw):
        pos = seen["pos"]
        assert n == len(pos) > k
        ident = torch.cat([pos.im_inds[:, None].float(), pos.fpn_levels[:, None].float(), pos.locations], 1)
        want = torch.cat([kept["im_inds"][:, None].float(), kept["fpn_levels"][:, None].float(),
                          kept["locations"]], 1)
        first = [int((ident == w).all(1).nonzero()[0, 0]) for w in want]
        rest = [i for i in randperm(n).tolist() if i not in first]
        return torch.tensor(first + rest, **kw)

    monkeypatch.setattr(torch, "randperm", controlled)
    losses = run_train(model, fx)
    h.remove()
    assert_same_losses(losses, extra["losses_sampled"])
    assert abs(losses["loss_mask"].item() - fx["losses"]["loss_mask"].item()) > 1e-3  # a real subset


def test_condinst_semantic_loss_configs(condinst):
    """The "w/ sem." configs (AdelaiDet's MS_R_50_3x_sem, d2seg's R_50_3x_sem): the same
    weights plus the semantic head; every loss, loss_sem included, equal."""
    fx, _ = condinst
    extra = fx["train_extra"]
    model = build_d2seg(fx, config=extra["sem_config"], extra_weights=extra["sem_weights"])
    losses = run_train(model, fx)
    assert "loss_sem" in extra["losses_sem"]
    assert_same_losses(losses, extra["losses_sem"])


def test_condinst_fixture_sees_the_conventions(condinst):
    """With d2seg's own conventions (the keys' defaults) the fixture's values are not met:
    the parity above is evidence about those keys."""
    fx, _ = condinst
    model = build_d2seg(fx, ["MODEL.CONDINST.UPSAMPLING", "centers"])
    store = {}
    capture_head(model, fx, ("mask_logits", _condinst_capture), store)
    assert max_diff(store["mask_feats"], fx["outputs"]["head"]["mask_feats"]) > 1e-3
    model = build_d2seg(fx, ["MODEL.CONDINST.MASK_CENTER_SAMPLING", False])
    n, _ = _num_positives(model, fx)
    assert n != fx["train_extra"]["num_pos"]


# ----------------------------------------------------------------------------- BlendMask


@pytest.fixture(scope="module")
def blendmask():
    fx = load_fixture("adelaidet_blendmask.pt")
    return fx, build_d2seg(fx)


def _blendmask_capture(orig, store):
    def mask_logits(bases, boxes, im_inds, attns):
        out = orig(bases, boxes, im_inds, attns)
        store["bases"] = bases.detach().clone()
        store["mask_logits"] = out.detach().clone()
        return out
    return mask_logits


def test_blendmask_attention_size_of_the_released_checkpoints(blendmask):
    fx, model = blendmask
    assert fx["weights"]["top_layer.weight"].shape[0] == 4 * 14 * 14
    assert model.mask_head.attn_size == 14


def test_blendmask_head_outputs(blendmask):
    fx, model = blendmask
    store = {}
    out, _ = capture_head(model, fx, ("mask_logits", _blendmask_capture), store)
    ref = fx["outputs"]["head"]
    assert_fcos_outputs(model, out, ref)
    assert_close_output(store["bases"], ref["bases"], "bases")
    assert_close_output(store["mask_logits"], ref["mask_logits"], "blended mask logits")


def test_blendmask_results(blendmask):
    fx, model = blendmask
    ref = fx["outputs"]["results"]
    assert any((r["pred_boxes"] == 0).any() for r in ref)
    fill = torch.cat([r["pred_masks"].float().mean((1, 2)) for r in ref])
    assert (fill > 0.001).sum() >= 5
    store = {}
    _, results = capture_head(model, fx, ("mask_logits", _blendmask_capture), store)
    # d2seg's mask probabilities pasted as detector_postprocess pastes them, unthresholded
    from detectron2.layers.mask_ops import _do_paste_mask

    probs, soft = store["mask_logits"].sigmoid(), []
    for res in results:
        inst = res["instances"]
        n, (h, w) = len(inst), inst.image_size
        pasted, _ = _do_paste_mask(probs[:n, None], inst.pred_boxes.tensor, h, w, skip_empty=False)
        soft.append(pasted)
        probs = probs[n:]
    assert probs.shape[0] == 0
    assert_same_results(results, ref, soft, threshold=model.mask_head.mask_threshold)


def test_blendmask_losses(blendmask):
    fx, model = blendmask
    assert_same_losses(run_train(model, fx), fx["losses"])


def test_blendmask_basis_labels_are_adelaidets(blendmask):
    """The basis loss's targets from the instances equal the labels AdelaiDet reads from its
    prepared files (instances painted in order), at its sampling."""
    from reference_condinst_blendmask import basis_semantic_labels

    from d2seg.blendmask.basis_module import painted_semantic_targets

    fx, _ = blendmask
    for d in fx["inputs"]:
        g = d["instances"]
        labels = basis_semantic_labels(g)
        ours = painted_semantic_targets([g["gt_masks"].float()], [g["gt_classes"]], 8)[0]
        assert torch.equal(ours, labels[::8, ::8])


def test_blendmask_fixture_sees_the_conventions(blendmask):
    fx, _ = blendmask
    model = build_d2seg(fx, ["MODEL.BLENDMASK.CROP_UNCLIPPED_BOXES", False])
    store = {}
    capture_head(model, fx, ("mask_logits", _blendmask_capture), store)
    assert max_diff(store["mask_logits"], fx["outputs"]["head"]["mask_logits"]) > 1e-2
    model = build_d2seg(fx, ["MODEL.BASIS_MODULE.SEM_TARGETS", "smallest_at_centers"])
    losses = run_train(model, fx)
    assert abs(losses["loss_basis_sem"].item() - fx["losses"]["loss_basis_sem"].item()) > 1e-4


def test_blendmask_mask_threshold_is_read(blendmask):
    fx, _ = blendmask
    lo = run_eval(build_d2seg(fx, ["MODEL.BLENDMASK.MASK_THRESHOLD", 0.3]), fx)
    hi = run_eval(build_d2seg(fx, ["MODEL.BLENDMASK.MASK_THRESHOLD", 0.7]), fx)
    a = sum(r["instances"].pred_masks.sum().item() for r in lo)
    b = sum(r["instances"].pred_masks.sum().item() for r in hi)
    assert a > b
