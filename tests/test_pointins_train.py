"""PointINS through d2seg's Trainer and Detectron2's COCOEvaluator on the built-in data set:
a few iterations then bbox and segm evaluation (fast); the full common CPU budget reaching
the yardstick's mask AP (slow, `make test-slow`)."""
import json
import os

import pytest

from conftest import CONFIGS, tiny_opts

CONFIGS_PI = {
    "retinanet": (os.path.join(CONFIGS, "PointINS", "pointins_retinanet_R18_shapes.yaml"),
                  "MODEL__RETINANET__SCORE_THRESH_TEST"),
    "fcos": (os.path.join(CONFIGS, "PointINS", "pointins_fcos_R18_shapes.yaml"), "MODEL__FCOS__INFERENCE_TH_TEST"),
}
# Mask R-CNN's mask AP on shapes_val after the common budget (README, configs/quick/mask_rcnn_shapes.yaml).
YARDSTICK_MASK_AP = 49.8  # seed 42, 2000 iterations (README, "The common CPU budget")


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


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(CONFIGS_PI))
def test_common_budget_reaches_the_yardstick_mask_ap(variant, tmp_path):
    """The full shapes budget (2000 iterations x 4 images, most of an hour on one CPU thread)."""
    from d2seg.engine import Trainer, setup_cfg

    cfg = setup_cfg(CONFIGS_PI[variant][0], ["OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)
    assert results["segm"]["AP"] >= YARDSTICK_MASK_AP, results
