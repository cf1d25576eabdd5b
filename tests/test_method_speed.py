"""dev/bench/method_speed.py on the small shapes models (the script itself builds R-50 ones):
random weights with the score thresholds at 0 and the box regressors zeroed return the full
100 non-degenerate detections, and the mask stage is timed inside the whole call."""
import torch

from conftest import load_script

speed = load_script("dev/bench/method_speed.py")


def test_every_model_returns_its_full_detections_and_the_mask_stage_is_timed():
    names = [("Mask R-CNN", "configs/quick/mask_rcnn_shapes.yaml"),
             ("PointINS-FCOS", "configs/PointINS/pointins_fcos_R18_shapes.yaml")]
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    models = []
    for name, path in names:
        cfg = speed._d2seg_cfg(path, depth=18, device="cpu")
        assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0 and cfg.MODEL.FCOS.INFERENCE_TH_TEST == 0.0
        model = build_model(cfg)
        speed.make_boxes_regular(model)
        models.append((name, model.eval()))
    inputs = [{"image": torch.rand(3, 64, 80) * 255, "height": 64, "width": 80}]
    runs = speed.time_models(models, inputs, warmup=0, repeats=2, device="cpu")
    for (name, _), (wall, cpu, stage, out) in zip(models, runs):
        assert len(wall) == len(cpu) == len(stage) == 2, name
        assert all(0 < s < w for s, w in zip(stage, wall)), (name, stage, wall)
        assert len(out) == 100, name
        boxes = out.pred_boxes.tensor
        assert bool(((boxes[:, 2] - boxes[:, 0]) > 1).all() and ((boxes[:, 3] - boxes[:, 1]) > 1).all()), name
        assert out.pred_masks.shape == (100, 64, 80), name
