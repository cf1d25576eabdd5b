"""Fixture builders for Detectron2's PointRend project (see dev/reference/reference_fixtures.py).

``--checkout``: a Detectron2 source tree with ``projects/PointRend`` and
``configs/Base-RCNN-FPN.yaml`` (the project's configs inherit it); the project is imported
from there and runs on the installed detectron2. Nothing is stubbed or patched.

pointrend-instance: InstanceSegmentation/pointrend_rcnn_R_50_FPN_1x_coco.yaml
pointrend-semantic: SemanticSegmentation/pointrend_semantic_R_101_FPN_1x_cityscapes.yaml with
    RESNETS.DEPTH 50 (the Semantic FPN R-50 Cityscapes model)

Both narrowed by the width overrides below, random weights from the seed. Training losses
are computed after ``torch.manual_seed(train_seed)`` (stored in ``train_extra``): RPN/ROI
subsampling and the random point selection then draw the same numbers on the d2seg side,
whose test seeds the same way.
"""
from typing import Dict

import torch

from reference_fixtures import instances_to_dict, on_path, seed_all, synthetic_images, to_detectron2_inputs

REFERENCES = {
    "pointrend-instance": "Detectron2 PointRend, Mask R-CNN R-50-FPN COCO (pointrend_rcnn_R_50_FPN_1x_coco.yaml)",
    "pointrend-semantic": "Detectron2 PointRend, Semantic FPN R-50 Cityscapes (R-101 config with DEPTH 50)",
}

_BACKBONE = [("MODEL.RESNETS.STEM_OUT_CHANNELS", 16), ("MODEL.RESNETS.RES2_OUT_CHANNELS", 16),
             ("MODEL.RESNETS.WIDTH_PER_GROUP", 4)]

# (reference key, d2seg key or None when d2seg reads another key for it, value)
NARROW = {
    "pointrend-instance": _BACKBONE + [
        ("MODEL.FPN.OUT_CHANNELS", 16),
        ("MODEL.ROI_HEADS.NUM_CLASSES", 8),
        ("MODEL.ROI_BOX_HEAD.FC_DIM", 32),
        ("MODEL.ROI_MASK_HEAD.CONV_DIM", 16),
        ("MODEL.ROI_MASK_HEAD.FC_DIM", "MODEL.POINTREND.COARSE_HEAD.FC_DIM", 32),
        ("MODEL.POINT_HEAD.FC_DIM", "MODEL.POINTREND.POINT_HEAD.FC_DIM", 16),
        ("MODEL.POINT_HEAD.NUM_CLASSES", None, 8),
        ("TEST.DETECTIONS_PER_IMAGE", 6),
    ],
    "pointrend-semantic": _BACKBONE + [
        ("MODEL.RESNETS.DEPTH", 50),
        ("MODEL.FPN.OUT_CHANNELS", 32),
        ("MODEL.SEM_SEG_HEAD.CONVS_DIM", 32),  # GN with 32 groups
        ("MODEL.POINT_HEAD.FC_DIM", "MODEL.POINTREND.POINT_HEAD.FC_DIM", 16),
    ],
}
CONFIGS = {
    "pointrend-instance": ("projects/PointRend/configs/InstanceSegmentation/pointrend_rcnn_R_50_FPN_1x_coco.yaml",
                           "configs/PointRend/pointrend_rcnn_R_50_FPN_1x_coco.yaml"),
    "pointrend-semantic": ("projects/PointRend/configs/SemanticSegmentation/pointrend_semantic_R_101_FPN_1x_cityscapes.yaml",
                           "configs/PointRend/pointrend_semantic_R_50_FPN_1x_cityscapes.yaml"),
}
TRAIN_SEED = 1234
BOX_SCORE_GAIN = 4.0
MASK_GAIN = 10.0
POINT_GAIN = 10.0
POINT_BIAS = 0.6


def opts(name: str, side: str):
    out = []
    for item in NARROW[name]:
        if len(item) == 2:
            key, value = item
            ours = key
        else:
            key, ours, value = item
        k = key if side == "reference" else ours
        if k is not None:
            out += [k, value]
    return out


def _randomise(model, seed):
    """Random FrozenBN statistics/affine (activations of order 1 through the ResNet) and
    random biases where the init left zeros."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, b in model.named_buffers():
            if not k.startswith("backbone.bottom_up"):
                continue
            if k.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif k.endswith(".weight"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.3 + 0.2)
            elif k.endswith(".bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        for k, p in model.named_parameters():
            if k.endswith(".bias") and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return g


def build_reference_model(name: str, checkout: str, seed: int, opts_=None):
    """Detectron2's PointRend model of ``name`` plus ``opts_`` ([KEY, VALUE, ...]; default the
    narrowing of the fixtures, ``[]`` for the published widths), random weights from the seed,
    the instance model's gains applied (see the fixture's notes). Call inside
    ``on_path(f"{checkout}/projects/PointRend")``. -> (cfg, model)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from point_rend import add_pointrend_config

    cfg = get_cfg()
    add_pointrend_config(cfg)
    cfg.merge_from_file(f"{checkout}/{CONFIGS[name][0]}")
    cfg.merge_from_list(opts(name, "reference") if opts_ is None else list(opts_))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    seed_all(seed)
    model = build_model(cfg)
    _randomise(model, seed)
    if name != "pointrend-semantic":
        with torch.no_grad():
            # some boxes survive the 0.05 score threshold, a few per class
            model.roi_heads.box_predictor.cls_score.weight.mul_(BOX_SCORE_GAIN)
            model.roi_heads.mask_head.coarse_head.prediction.weight.mul_(MASK_GAIN)
            # masks that are neither empty nor full: point logits of both signs
            model.roi_heads.mask_head.point_head.predictor.weight.mul_(POINT_GAIN)
            model.roi_heads.mask_head.point_head.predictor.bias.add_(POINT_BIAS)
    return cfg, model


def build_fixture(name: str, checkout: str, seed: int) -> Dict:
    with on_path(f"{checkout}/projects/PointRend"):
        cfg, model = build_reference_model(name, checkout, seed)
        semantic = name == "pointrend-semantic"
        head = {}
        hooks = []
        if semantic:
            inputs = synthetic_images(seed, sizes=((96, 128), (128, 96)), num_classes=18)
            for d in inputs:
                inst = d.pop("instances")
                sem = torch.zeros(d["height"], d["width"], dtype=torch.int64)
                for m, c in zip(inst["gt_masks"], inst["gt_classes"]):
                    sem[m] = int(c) + 1
                sem[:3, :] = 255  # an ignored band
                d["sem_seg"] = sem
            # the coarse head's predictor: the stride-4 coarse logits
            hooks.append(model.sem_seg_head.coarse_sem_seg_head.predictor.register_forward_hook(
                lambda _m, _i, out: head.__setitem__("coarse_sem_seg", out.detach().clone())))
        else:
            inputs = synthetic_images(seed, num_classes=8)

            def box_hook(_m, _i, out):
                head["box_scores"], head["box_deltas"] = out[0].detach().clone(), out[1].detach().clone()

            hooks.append(model.roi_heads.box_predictor.register_forward_hook(box_hook))
            hooks.append(model.roi_heads.mask_head.coarse_head.register_forward_hook(
                lambda _m, _i, out: head.__setitem__("coarse_mask", out.detach().clone())))
        model.eval()
        with torch.no_grad():
            results = model(to_detectron2_inputs(inputs))
        for h in hooks:
            h.remove()
        if semantic:
            # argmax and margin (largest - second largest logit) per pixel: the full logits are too big
            results = [{"sem_seg_argmax": r["sem_seg"].argmax(0).to(torch.uint8), "sem_seg_margin": (lambda t: t[0] - t[1])(r["sem_seg"].topk(2, dim=0).values.detach())} for r in results]
        else:
            results = [instances_to_dict(r["instances"]) for r in results]
        model.train()
        from detectron2.utils.events import EventStorage

        with EventStorage(0):
            torch.manual_seed(TRAIN_SEED)
            losses = {k: v.detach() for k, v in model(to_detectron2_inputs(inputs)).items()}

    ref_cfg, d2_cfg = CONFIGS[name]
    return {
        "repo": "facebookresearch/detectron2",
        "reference_config": ref_cfg + (" + RESNETS.DEPTH 50" if semantic else ""),
        "d2seg_config": d2_cfg,
        "d2seg_opts": opts(name, "d2seg"),
        "seed": seed,
        "notes": "projects/PointRend run unchanged on the installed detectron2; random init from the "
                 "seed, FrozenBN statistics and zero biases randomised"
                 + ("" if semantic else f", box class and coarse mask prediction weights scaled (x{BOX_SCORE_GAIN}, x{MASK_GAIN}) "
                    "so that detections pass the score threshold, point predictor weights "
                    f"x{POINT_GAIN} "
                    f"and bias +{POINT_BIAS} (masks neither empty nor full)"),
        "weights": dict(model.state_dict()),
        "inputs": inputs,
        "outputs": {"head": head, "results": results},
        "losses": losses,
        "train_extra": {"train_seed": TRAIN_SEED},
    }
