"""d2seg's PointRend next to Detectron2's own (detectron2.projects.point_rend): both
configurable and buildable in one process, and upstream's weights loaded into ours give
the same detections and masks."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import d2seg  # noqa: F401
import d2seg.pointrend.mask_head as our_mask_head
from d2seg.config import get_d2seg_cfg
from d2seg.pointrend import config_from_upstream, convert_upstream_state_dict

point_rend = pytest.importorskip("detectron2.projects.point_rend")
import detectron2.projects.point_rend.mask_head as up_mask_head  # noqa: E402


def upstream_cfg(num_classes=5):
    """Upstream's PointRend Mask R-CNN (its published R-50 config's model keys) on a
    small ResNet-18 so that the test stays fast."""
    cfg = get_cfg()
    point_rend.add_pointrend_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200
    cfg.MODEL.ROI_HEADS.NAME = "PointRendROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep detections
    cfg.TEST.DETECTIONS_PER_IMAGE = 12
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
    # Upstream builds its 2x2 conv with CONV_DIM inputs whatever the FPN width (it fails
    # on 64-channel FPNs when CONV_DIM > 64); ours takes the true width. Keep them equal.
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
    cfg.MODEL.POINT_HEAD.NUM_CLASSES = num_classes
    return cfg


def randomize_mask_head(model, seed):
    """Random weights scaled so that mask logits are O(1), not ~0 as with the default
    initialisation of the predictors (which would make every point equally uncertain)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # A random ResNet with frozen BN gives FPN outputs of ~200; bring them to ~0.6 so
        # that float32 rounding stays well below the 1e-4 tolerance on the logits (at ~2, one
        # logit of 602k differed by 4e-4 with single-threaded MKL: the two implementations
        # sum in different orders, and the rounding error scales with the activations).
        for name, p in model.backbone.named_parameters():
            if name.startswith("fpn_output"):
                p.mul_(0.003)
        for name, p in model.roi_heads.mask_head.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


class _Recorder:
    """Keeps the mask logits each mask head hands to Mask R-CNN's inference."""

    def __init__(self, module, monkeypatch):
        self.logits = None
        orig = module.mask_rcnn_inference

        def record(logits, instances):
            self.logits = logits.detach().clone()
            return orig(logits, instances)

        monkeypatch.setattr(module, "mask_rcnn_inference", record)


def test_configs_coexist_on_one_cfg():
    cfg = get_d2seg_cfg()
    point_rend.add_pointrend_config(cfg)  # upstream after ours
    assert cfg.MODEL.POINTREND.POINT_HEAD.NAME == "PointRendMLPPointHead"
    assert cfg.MODEL.POINT_HEAD.NAME == "StandardPointHead"
    cfg2 = get_cfg()
    point_rend.add_pointrend_config(cfg2)  # ours after upstream
    from d2seg.config import add_d2seg_config

    add_d2seg_config(cfg2)
    assert cfg2.MODEL.POINTREND.SUBDIVISION_NUM_POINTS == 784
    assert cfg2.MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS == 784


def test_both_projects_build_in_one_process_with_distinct_names():
    ucfg = upstream_cfg()
    up = build_model(ucfg)
    ours = build_model(config_from_upstream(ucfg))
    assert type(up.roi_heads.mask_head).__name__ == "PointRendMaskHead"
    assert type(ours.roi_heads.mask_head).__name__ == "D2SegPointRendMaskHead"
    assert type(ours.roi_heads).__name__ == "D2SegPointRendROIHeads"
    assert type(ours.roi_heads.mask_head).__module__.startswith("d2seg.")
    # Same parameter names and shapes: upstream checkpoints load directly.
    up_sd, our_sd = up.state_dict(), ours.state_dict()
    assert set(up_sd) == set(our_sd)
    assert all(up_sd[k].shape == our_sd[k].shape for k in up_sd)


@pytest.mark.parametrize("seed", [0, 1])
def test_upstream_weights_give_same_masks_and_scores(seed, monkeypatch):
    torch.manual_seed(seed)
    ucfg = upstream_cfg()
    up = build_model(ucfg).eval()
    ours = build_model(config_from_upstream(ucfg)).eval()
    randomize_mask_head(up, seed)
    incompatible = ours.load_state_dict(convert_upstream_state_dict(up.state_dict()), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    rec_up = _Recorder(up_mask_head, monkeypatch)
    rec_ours = _Recorder(our_mask_head, monkeypatch)
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 96, 128, generator=g) * 255
    with torch.no_grad():
        out_up = up.inference([{"image": image}], do_postprocess=False)[0]
        out_ours = ours.inference([{"image": image}], do_postprocess=False)[0]

    assert len(out_up) == len(out_ours) == 12
    torch.testing.assert_close(out_ours.scores, out_up.scores, rtol=0, atol=0)
    torch.testing.assert_close(out_ours.pred_boxes.tensor, out_up.pred_boxes.tensor, rtol=0, atol=0)
    assert torch.equal(out_ours.pred_classes, out_up.pred_classes)
    # Upstream carries all K class channels through subdivision; ours only the detected one.
    up_logits = rec_up.logits[torch.arange(len(out_up)), out_up.pred_classes].unsqueeze(1)
    assert rec_ours.logits.shape == up_logits.shape == (12, 1, 224, 224)
    assert up_logits.abs().mean() > 0.1  # the comparison is not between near-zero maps
    torch.testing.assert_close(rec_ours.logits, up_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out_ours.pred_masks, out_up.pred_masks, rtol=0, atol=1e-5)
