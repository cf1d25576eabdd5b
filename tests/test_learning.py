"""Every method learns: a short CPU fit to a few fixed shapes images must reach a real bar.

Each shapes config is fitted by tests/fitting.py (a few images of ``shapes_train`` at 64 px,
one fixed batch, tens of iterations: see ``fitting.PLANS``) and then evaluated with
Detectron2's own evaluators on exactly the images it was fitted to: COCOEvaluator (box AP,
and mask AP for the instance-segmentation methods) or SemSegEvaluator (mIoU). A model that
does not learn (a wrong target, a sign error in a loss, a broken assignment, post-processing
that drops the right detections) stays far below these bars, which are several times what
the same methods reached after the former 300-iteration budget on the whole data set (1-5
AP).

The bars sit at about 70 % of what each fit reached when they were set (``REACHED``), with
margin for the float differences between machines: the fits are deterministic on one
machine, but not bit-identical across CPUs.
"""
import math

import pytest

from fitting import SHAPES_CONFIGS, evaluate, fitted

# config -> {task: bar}; task "bbox" / "segm": COCO AP (%), "sem_seg": mIoU (%).
BARS = {
    "BlendMask/blendmask_R18_shapes.yaml": {"bbox": 40, "segm": 40},
    "CondInst/condinst_R18_shapes.yaml": {"bbox": 18, "segm": 30},
    "FCOS/fcos_R18_shapes.yaml": {"bbox": 50},
    "FCOS/retinanet_shapes.yaml": {"bbox": 70},
    "MEInst/meinst_R18_shapes.yaml": {"bbox": 40, "segm": 35},
    "PointINS/pointins_fcos_R18_shapes.yaml": {"bbox": 50, "segm": 33},
    "PointINS/pointins_retinanet_R18_shapes.yaml": {"bbox": 60, "segm": 30},
    "PointRend/pointrend_rcnn_R18_shapes.yaml": {"bbox": 35, "segm": 35},
    "PointRend/pointrend_semantic_R18_shapes.yaml": {"sem_seg": 70},
    "PointRend/pointrend_sparseinst_r18_giam_shapes.yaml": {"segm": 24},
    "SOLO/decoupled_solo_shapes.yaml": {"segm": 24},
    "SOLO/solo_shapes.yaml": {"segm": 10},
    "SOLO/solov2_shapes.yaml": {"segm": 20},
    "SparseInst/sparse_inst_r18_giam_shapes.yaml": {"segm": 28},
    "quick/mask_rcnn_shapes.yaml": {"bbox": 30, "segm": 12},
    "quick/semantic_fpn_shapes.yaml": {"sem_seg": 70},
}

# What each fit reached when the bars were set (2 Dec 2026, this project's 2-core machine,
# `OMP_NUM_THREADS=1 .venv/bin/python -m pytest -s tests/test_learning.py`: the fits run in
# one-thread worker processes, so these repeat exactly on this machine). The bars are about
# 70 % of these. SOLO's low value is the plan (80 iterations at 64 px, where SOLO's grids
# are coarse for its smallest level), not a bound on the method.
REACHED = {
    "BlendMask/blendmask_R18_shapes.yaml": {"bbox": 59.6, "segm": 54.7},
    "CondInst/condinst_R18_shapes.yaml": {"bbox": 28.5, "segm": 44.8},
    "FCOS/fcos_R18_shapes.yaml": {"bbox": 71.8},
    "FCOS/retinanet_shapes.yaml": {"bbox": 98.6},
    "MEInst/meinst_R18_shapes.yaml": {"bbox": 62.2, "segm": 52.4},
    "PointINS/pointins_fcos_R18_shapes.yaml": {"bbox": 71.8, "segm": 47.1},
    "PointINS/pointins_retinanet_R18_shapes.yaml": {"bbox": 89.1, "segm": 42.4},
    "PointRend/pointrend_rcnn_R18_shapes.yaml": {"bbox": 51.7, "segm": 49.3},
    "PointRend/pointrend_semantic_R18_shapes.yaml": {"sem_seg": 89.6},
    "PointRend/pointrend_sparseinst_r18_giam_shapes.yaml": {"segm": 34.0},
    "SOLO/decoupled_solo_shapes.yaml": {"segm": 34.7},
    "SOLO/solo_shapes.yaml": {"segm": 14.5},
    "SOLO/solov2_shapes.yaml": {"segm": 29.5},
    "SparseInst/sparse_inst_r18_giam_shapes.yaml": {"segm": 41.2},
    "quick/mask_rcnn_shapes.yaml": {"bbox": 43.2, "segm": 17.0},
    "quick/semantic_fpn_shapes.yaml": {"sem_seg": 89.1},
}


def test_every_shapes_config_has_a_bar():
    assert len(SHAPES_CONFIGS) >= 16, SHAPES_CONFIGS
    assert sorted(BARS) == SHAPES_CONFIGS


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_method_learns_to_a_real_bar(config):
    fit = fitted(config)
    # the loss fell: the last iterations' mean is well under the first iteration's
    last = sum(fit.losses[-5:]) / 5
    assert all(math.isfinite(v) for v in fit.losses), fit.losses
    assert last < 0.7 * fit.losses[0], f"{config}: loss {fit.losses[0]:.3f} -> {last:.3f}"
    results = evaluate(fit)
    seen = {}
    for task, bar in BARS[config].items():
        metric = "mIoU" if task == "sem_seg" else "AP"
        value = results[task][metric]
        seen[task] = value
        assert value >= bar, (f"{config}: {task} {metric} {value:.1f} < bar {bar} after "
                              f"fitting {len(fit.batch)} images for {len(fit.losses)} iterations "
                              f"(reached {REACHED.get(config, {}).get(task)} when the bar was set)")
    print(config, {k: round(v, 1) for k, v in seen.items()}, f"fit {fit.seconds:.1f} s")
