"""Every method can fit what it is shown: a short CPU fit to a few fixed shapes images must
reach a real bar, measured on those same images.

What the bars measure is memorisation, not generalisation. Each shapes config is fitted by
tests/fitting.py to a handful of images of ``shapes_train`` (64 px, one fixed batch, tens of
iterations: see ``fitting.PLANS``) and then evaluated with Detectron2's own evaluators on
exactly the images it was fitted to: COCOEvaluator (box AP, and mask AP for the
instance-segmentation methods) or SemSegEvaluator (mIoU). These APs are therefore APs on the
training images. A model that cannot fit four images (a wrong target, a sign error in a
loss, a broken assignment, a head cut off from its features, post-processing that drops the
right detections) stays far below the bars; a model that passes may still generalise
badly. Held-out AP (``shapes_val`` after the common 2000-iteration budget) is another
quantity, measured by full trainings and reported in docs/results.md; the two must not be
compared.

The bars sit at 70-80 % of the lowest value each fit reached (``REACHED``) over the fit
itself and the same fit from slightly perturbed initial weights: the fits are deterministic
on one machine, but another CPU rounds differently and a few dozen iterations amplify that
(dev/diagnose/fit_spread.py measures the spread; tests/fitting.py, PLANS).

Negative controls show that the bars discriminate: the same fits with the model broken on
purpose stay below every bar of their config. A head that cannot see the image
(``fitting.blind``) still lowers its loss as much as the loss check asks, and a model whose
classification output is wrong keeps its boxes and masks; neither reaches a bar.
"""
import dataclasses
import math

import pytest

from fitting import SHAPES_CONFIGS, evaluate, fitted, plan_for

# config -> {task: bar}; task "bbox" / "segm": COCO AP (%), "sem_seg": mIoU (%).
BARS = {
    "BlendMask/blendmask_R18_shapes.yaml": {"bbox": 40, "segm": 40},
    "CondInst/condinst_R18_shapes.yaml": {"bbox": 18, "segm": 30},
    "FCOS/fcos_R18_shapes.yaml": {"bbox": 40},
    "FCOS/retinanet_shapes.yaml": {"bbox": 70},
    "MEInst/meinst_R18_shapes.yaml": {"bbox": 40, "segm": 36},
    "PointINS/pointins_fcos_R18_shapes.yaml": {"bbox": 50, "segm": 33},
    "PointINS/pointins_retinanet_R18_shapes.yaml": {"bbox": 60, "segm": 30},
    "PointRend/pointrend_rcnn_R18_shapes.yaml": {"bbox": 35, "segm": 35},
    "PointRend/pointrend_semantic_R18_shapes.yaml": {"sem_seg": 70},
    "PointRend/pointrend_sparseinst_r18_giam_shapes.yaml": {"segm": 47},
    "PointRend/pointrend_sparseinst_r18_giam_loc_shapes.yaml": {"bbox": 30, "segm": 44},
    "SOLO/decoupled_solo_shapes.yaml": {"segm": 24},
    "SOLO/solo_shapes.yaml": {"segm": 10},
    "SOLO/solov2_shapes.yaml": {"segm": 20},
    "SparseInst/sparse_inst_r18_giam_shapes.yaml": {"segm": 37},
    "SparseInst/sparse_inst_r18_giam_loc_shapes.yaml": {"bbox": 31, "segm": 38},
    "quick/mask_rcnn_shapes.yaml": {"bbox": 46, "segm": 19},
    "quick/semantic_fpn_shapes.yaml": {"sem_seg": 70},
}

# What each fit reached (6 Dec 2026, this project's 2-core machine, one thread): the lowest
# and highest value over the fit itself and the same fit with its initial weights perturbed
# by 1e-7, 2e-7 (and 3e-7 where a plan changed), which stand in for another CPU's rounding
# (dev/diagnose/fit_spread.py; tests/fitting.py, PLANS). The bars are about 70 % of the lowest where
# a plan changed; where the spread was narrow the earlier, higher bars stay (70-80 %).
# SOLO's low value is the plan (80 iterations at 64 px, where SOLO's grids are coarse for its
# smallest level), not a bound on the method.
REACHED = {
    "BlendMask/blendmask_R18_shapes.yaml": {"bbox": (59.6, 64.6), "segm": (51.6, 55.5)},
    "CondInst/condinst_R18_shapes.yaml": {"bbox": (28.5, 73.9), "segm": (42.2, 45.2)},
    "FCOS/fcos_R18_shapes.yaml": {"bbox": (58.1, 85.7)},
    "FCOS/retinanet_shapes.yaml": {"bbox": (98.6, 99.6)},
    "MEInst/meinst_R18_shapes.yaml": {"bbox": (57.5, 80.8), "segm": (52.0, 77.4)},
    "PointINS/pointins_fcos_R18_shapes.yaml": {"bbox": (68.8, 75.4), "segm": (41.3, 47.1)},
    "PointINS/pointins_retinanet_R18_shapes.yaml": {"bbox": (87.1, 89.5), "segm": (41.9, 42.4)},
    "PointRend/pointrend_rcnn_R18_shapes.yaml": {"bbox": (43.5, 51.7), "segm": (45.0, 49.3)},
    "PointRend/pointrend_semantic_R18_shapes.yaml": {"sem_seg": (89.1, 89.6)},
    "PointRend/pointrend_sparseinst_r18_giam_shapes.yaml": {"segm": (68.2, 78.6)},
    "PointRend/pointrend_sparseinst_r18_giam_loc_shapes.yaml": {"bbox": (42.8, 67.3), "segm": (62.9, 64.8)},
    "SOLO/decoupled_solo_shapes.yaml": {"segm": (34.7, 34.7)},
    "SOLO/solo_shapes.yaml": {"segm": (14.0, 15.4)},
    "SOLO/solov2_shapes.yaml": {"segm": (29.2, 29.7)},
    "SparseInst/sparse_inst_r18_giam_shapes.yaml": {"segm": (53.8, 60.2)},
    "SparseInst/sparse_inst_r18_giam_loc_shapes.yaml": {"bbox": (45.0, 59.0), "segm": (55.5, 61.9)},
    "quick/mask_rcnn_shapes.yaml": {"bbox": (66.5, 75.0), "segm": (27.5, 39.0)},
    "quick/semantic_fpn_shapes.yaml": {"sem_seg": (87.9, 89.1)},
}


def test_every_shapes_config_has_a_bar():
    assert len(SHAPES_CONFIGS) >= 16, SHAPES_CONFIGS
    assert sorted(BARS) == SHAPES_CONFIGS


def loss_fell(fit):
    """The loss check of the learning test: every loss finite and the last iterations' mean
    well under the first iteration's. Returns (passed, that mean)."""
    last = sum(fit.losses[-5:]) / 5
    return all(math.isfinite(v) for v in fit.losses) and last < 0.7 * fit.losses[0], last


def bar_values(config, results):
    """{task: (value, bar)} for each bar of ``config``, from Detectron2's evaluation
    ``results``: AP for "bbox" / "segm", mIoU for "sem_seg" (NaN where COCOEvaluator had no
    detection to score, which is below any bar)."""
    return {task: (results[task]["mIoU" if task == "sem_seg" else "AP"], bar)
            for task, bar in BARS[config].items()}


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_method_learns_to_a_real_bar(config):
    fit = fitted(config)
    fell, last = loss_fell(fit)
    assert fell, f"{config}: loss {fit.losses[0]:.3f} -> {last:.3f} ({fit.losses})"
    seen = bar_values(config, evaluate(fit))
    for task, (value, bar) in seen.items():
        assert value >= bar, (f"{config}: {task} {value:.1f} < bar {bar} after "
                              f"fitting {len(fit.batch)} images for {len(fit.losses)} iterations "
                              f"(reached {REACHED.get(config, {}).get(task)} over perturbed fits when the bar was set)")
    print(config, {k: round(v, 1) for k, (v, _) in seen.items()}, f"fit {fit.seconds:.1f} s")


def test_negative_control_blind_head_stays_below_the_bar():
    """Semantic FPN fitted by its own plan with its predictor blind: the 1x1 convolution that
    turns features into class logits sees zeros, so its logits are the same at every pixel
    of every image. It learns the class frequencies, which lowers the loss by more than the
    loss check asks (1.79 -> 0.84 when this was written), so the loss check alone would pass
    it; the mIoU bar does not (13.2 against 70). The fit takes a few seconds."""
    config = "quick/semantic_fpn_shapes.yaml"
    fit = fitted(config, dataclasses.replace(plan_for(config), blind="sem_seg_head.predictor"))
    fell, last = loss_fell(fit)
    assert fell, f"the blind head's loss did not fall: {fit.losses[0]:.3f} -> {last:.3f}"
    seen = bar_values(config, evaluate(fit))
    print(config, "blind predictor:", {k: round(v, 1) for k, (v, _) in seen.items()},
          f"loss {fit.losses[0]:.3f} -> {last:.3f}, fit {fit.seconds:.1f} s")
    for task, (value, bar) in seen.items():
        assert not value >= bar, f"{config} with a blind predictor: {task} {value:.1f} reaches the bar {bar}"


def test_negative_control_wrong_classes_stay_below_every_bar():
    """The yardstick's own fit (the one test_method_learns_to_a_real_bar evaluates; no extra
    fit) with its classification output broken at inference: every detection's class is
    replaced by the next one. Boxes, scores and masks are unchanged, so box and mask AP fall
    below their bars only because the bars demand the right class."""
    from detectron2.data import MetadataCatalog

    config = "quick/mask_rcnn_shapes.yaml"
    fit = fitted(config)
    num_classes = len(MetadataCatalog.get(fit.cfg.DATASETS.TEST[0]).thing_classes)

    def next_class(_module, _inputs, outputs):
        for out in outputs:
            out["instances"].pred_classes = (out["instances"].pred_classes + 1) % num_classes

    handle = fit.model.register_forward_hook(next_class)
    try:
        seen = bar_values(config, evaluate(fit))
    finally:
        handle.remove()
    print(config, "every class shifted:", {k: round(v, 1) for k, (v, _) in seen.items()})
    for task, (value, bar) in seen.items():
        assert not value >= bar, f"{config} with every class shifted: {task} {value:.1f} reaches the bar {bar}"
