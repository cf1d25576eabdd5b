"""PointINS through d2seg's Trainer and Detectron2's COCOEvaluator on the built-in data set:
a few iterations then bbox and segm evaluation (fast); the full common CPU budget reaching
a mask AP bar set from PointINS's own measured runs (slow, `make test-slow`)."""
import json
import os

import pytest

from conftest import CONFIGS, tiny_opts

CONFIGS_PI = {
    "retinanet": (os.path.join(CONFIGS, "PointINS", "pointins_retinanet_R18_shapes.yaml"),
                  "MODEL__RETINANET__SCORE_THRESH_TEST"),
    "fcos": (os.path.join(CONFIGS, "PointINS", "pointins_fcos_R18_shapes.yaml"), "MODEL__FCOS__INFERENCE_TH_TEST"),
}
# Mask AP on shapes_val after the common budget (2000 iterations x 4 images, one thread) of
# the shipped configs from scratch, seed 42 and seed 43 (README's method table; docs/pointins.md).
MEASURED_MASK_AP = {"retinanet": (28.1, 27.5), "fcos": (20.2, 20.6)}
# ... and after 300 iterations, seeds 42 / 43 (docs/pointins.md): a model that has barely started.
EARLY_MASK_AP = {"retinanet": (2.64, 3.00), "fcos": (3.32, 3.17)}
# The slow test's bars: about 4 points (15-21 %) under the lower of the two seeds. The seeds
# differ by 0.4-0.6 points; the margin also covers the thread count and the machine (the
# runs used one thread; summation order changes with more) without letting a broken head
# through: each bar is far above the 300-iteration AP. The yardstick's 49.8 (Mask R-CNN) is
# not a bar for PointINS: its rows are 28.1 and 20.2.
MASK_AP_BAR = {"retinanet": 23.5, "fcos": 16.0}
MARGIN = 3.0  # points every bar keeps under the lower measured seed


@pytest.mark.parametrize("variant", sorted(CONFIGS_PI))
def test_train_and_coco_evaluation(variant, tmp_path):
    from d2seg.engine import Trainer, setup_cfg

    path, thresh = CONFIGS_PI[variant]
    cfg = setup_cfg(path, tiny_opts(tmp_path, max_iter=3, SOLVER__CHECKPOINT_PERIOD=1000, **{thresh: 0.0}))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)
    # three iterations learn nothing: this checks the pipeline (the AP bars are in
    # tests/test_learning.py); COCOEvaluator reported both tasks, per class too
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(results[task])
        assert sum(k.startswith("AP-") for k in results[task]) == 5, sorted(results[task])
    preds = json.load(open(tmp_path / "inference" / "coco_instances_results.json"))
    assert preds and all("segmentation" in p for p in preds)


@pytest.mark.parametrize("variant", sorted(CONFIGS_PI))
def test_slow_bars_are_reachable_and_demanding(variant):
    """The slow test's bar lies at least MARGIN under both measured seeds (so `make test-slow`
    can pass) and well above the 300-iteration AP (so it still needs a trained model)."""
    bar = MASK_AP_BAR[variant]
    assert bar <= min(MEASURED_MASK_AP[variant]) - MARGIN, (variant, bar, MEASURED_MASK_AP[variant])
    assert bar >= 4 * max(EARLY_MASK_AP[variant]), (variant, bar, EARLY_MASK_AP[variant])


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(CONFIGS_PI))
def test_common_budget_reaches_the_mask_ap_bar(variant, tmp_path):
    """The full shapes budget (2000 iterations x 4 images, 35-55 minutes on one CPU thread):
    mask AP at least MASK_AP_BAR (measured: 28.1 / 27.5 on RetinaNet, 20.2 / 20.6 on FCOS). From
    scratch (MODEL.WEIGHTS ""), as those runs were: the bars are the from-scratch rows."""
    from d2seg.engine import Trainer, setup_cfg

    cfg = setup_cfg(CONFIGS_PI[variant][0], ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", ""])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)
    assert results["segm"]["AP"] >= MASK_AP_BAR[variant], results
