#!/usr/bin/env python
"""Inference time of a d2seg method beside the model its paper (or its reference) compares
it with: R-50-FPN, random weights, one synthetic image, one process.

    # PointINS against Mask R-CNN (the paper's Table 10, there on a V100 with trained models)
    python dev/bench/method_speed.py pointins --input-size 800 1333 --threads 1
    # SparseInst (G-IAM and IAM) against Mask R-CNN at SparseInst's test size
    python dev/bench/method_speed.py sparseinst --input-size 640 640 --threads 1
    # d2seg's PointRend against Detectron2's PointRend project with the same weights
    python dev/bench/method_speed.py pointrend --input-size 800 1088 --repeats 3

The comparisons (the first model is the baseline of the ratios):

    pointins    Mask R-CNN (Detectron2's mask_rcnn_R_50_FPN_1x), PointINS-RetinaNet and
                PointINS-FCOS (configs/PointINS/Base-PointINS-*.yaml)
    sparseinst  Mask R-CNN, SparseInst R-50 G-IAM and IAM (configs/SparseInst/sparse_inst_r50_*.yaml),
                and G-IAM with DECODER.KERNEL_PRODUCT "auto" (the kernel x mask-feature
                product by d2seg.layers.dynamic_kernel_product instead of torch.bmm)
    pointrend   Detectron2's PointRend project (its pointrend_rcnn_R_50_FPN_1x_coco model;
                needs ``detectron2.projects.point_rend``, i.e. Detectron2 installed from its
                source tree) and d2seg's PointRend built from the same config
                (``d2seg.pointrend.config_from_upstream``) with upstream's weights loaded
                strictly; their outputs are compared after the timing

Random weights would give almost no detections (or degenerate boxes) and so time almost no
mask work. So every model gets the same treatment: every test-time score threshold is 0
(``d2seg.benchmark.all_detections_opts``) and the last box-regression layers are zeroed
(boxes = anchors / proposals; FCOS: distances of 2 strides around each point), so each
model returns TEST.DETECTIONS_PER_IMAGE (100) non-degenerate detections and computes and
pastes as many masks; PointRend's mask-head weights are rescaled so that its mask logits
are O(1) and the subdivision has real decisions to make.

After ``--warmup`` untimed calls of every model, each of ``--repeats`` rounds calls every
model once in turn on the same image (so every ratio is taken under the same machine
load). Reported per model: median and min wall seconds per image, the median process CPU
seconds (the steadier number on a shared machine; with ``--threads 1`` the single-core
time), the median seconds of the mask stage (Mask R-CNN, PointRend:
``ROIHeads._forward_mask``, i.e. pooling or point sampling + mask head + mask inference;
PointINS: templates at the points, instance-aware weights and convolution, mask head; "-"
where the model has no separate mask stage, e.g. SparseInst), the detections, and the
median over the baseline's median. Pre- and post-processing (padding, NMS, pasting masks
into the image) are included; pasting is outside the mask stage.
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"  # in Detectron2's model zoo


def _d2seg_cfg(config_file, depth, device, opts=()):
    """A d2seg config from ``config_file`` (Detectron2 model zoo name, or a path under the
    repository) and ``opts`` (KEY VALUE list), random weights, ResNet-``depth``, on
    ``device``, every test-time score threshold at 0."""
    from detectron2 import model_zoo

    from d2seg.benchmark import all_detections_opts
    from d2seg.config import get_d2seg_cfg

    cfg = get_d2seg_cfg()
    if config_file.startswith("configs/"):
        cfg.merge_from_file(os.path.join(REPO, config_file))
    else:
        cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.merge_from_list(list(opts))
    cfg.merge_from_list(all_detections_opts(cfg))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    return cfg


def upstream_pointrend_cfg(depth, device):
    """Detectron2's PointRend project, its ``pointrend_rcnn_R_50_FPN_1x_coco.yaml`` model
    (written out: the project's YAML files are not installed with Detectron2), score
    threshold 0."""
    from detectron2.config import get_cfg
    from detectron2.projects.point_rend import add_pointrend_config

    cfg = get_cfg()
    add_pointrend_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.ROI_HEADS.NAME = "PointRendROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
    cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    return cfg


def rescale_pointrend(model, seed=0):
    """Random frozen-BN ResNets give huge activations: scale the FPN outputs down and draw
    the mask head's weights with variance 1 / fan-in, so mask logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.startswith("fpn_output"):
                p.mul_(0.01)
        for p in model.roi_heads.mask_head.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


def make_boxes_regular(model) -> None:
    """Zero the last box-regression layers, so random weights give non-degenerate boxes:
    two-stage models return their anchors / proposals, RetinaNet its anchors, FCOS distances
    of 2 strides. Models without a box regressor (SparseInst) are left as they are."""
    from detectron2.modeling import GeneralizedRCNN

    from d2seg.fcos import OneStageDetector

    if isinstance(model, GeneralizedRCNN):
        layers, bias = [model.proposal_generator.rpn_head.anchor_deltas, model.roi_heads.box_predictor.bbox_pred], 0.0
    elif isinstance(model, OneStageDetector):
        layers, bias = [model.proposal_generator.fcos_head.bbox_pred], 2.0
    elif hasattr(getattr(model, "head", None), "bbox_pred"):
        layers, bias = [model.head.bbox_pred], 0.0
    else:
        return
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.fill_(bias)


def build_models(method, depth, device):
    """[(name, model)] of ``method``'s comparison on ``device`` in eval mode, the baseline first."""
    from detectron2.modeling import build_model

    if method == "pointrend":
        from d2seg.pointrend import config_from_upstream

        ucfg = upstream_pointrend_cfg(depth, device)
        upstream = build_model(ucfg)
        rescale_pointrend(upstream)
        ours = build_model(config_from_upstream(ucfg))
        models = [("Detectron2 PointRend", upstream), ("d2seg PointRend", ours)]
    else:
        giam = "configs/SparseInst/sparse_inst_r50_giam.yaml"
        configs = {
            "pointins": [("PointINS-RetinaNet", "configs/PointINS/Base-PointINS-RetinaNet.yaml", []),
                         ("PointINS-FCOS", "configs/PointINS/Base-PointINS-FCOS.yaml", [])],
            "sparseinst": [("SparseInst R-50 G-IAM", giam, []),
                           ("SparseInst R-50 IAM", "configs/SparseInst/sparse_inst_r50_base.yaml", []),
                           ("SparseInst R-50 G-IAM, KERNEL_PRODUCT auto", giam,
                            ["MODEL.SPARSE_INST.DECODER.KERNEL_PRODUCT", "auto"])],
        }[method]
        models = [(name, build_model(_d2seg_cfg(path, depth, device, opts))) for name, path, opts in
                  [("Mask R-CNN", MASK_RCNN, [])] + configs]
    for _, model in models:
        make_boxes_regular(model)
        model.eval()
    if method == "pointrend":
        ours.load_state_dict(upstream.state_dict(), strict=True)
    return models


def mask_stage_timer(model):
    """Wrap ``model``'s mask stage to accumulate its time; returns a one-element list of
    the seconds spent there since the caller last reset it, or None (no separate stage)."""
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        owner, name = model.roi_heads, "_forward_mask"
    elif hasattr(model, "mask_branch") or hasattr(getattr(model, "mask_head", None), "mask_branch"):
        owner, name = getattr(model, "mask_branch", None) or model.mask_head.mask_branch, "predict_points"
    else:
        return None
    fn = getattr(owner, name)
    spent = [0.0]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    setattr(owner, name, timed)
    return spent


def time_models(models, inputs, warmup, repeats, device):
    """Per model: (wall times, process CPU times, mask-stage times or None, Instances of the
    last call). The models are called in turn, one call each per round."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    timers = [mask_stage_timer(m) for _, m in models]
    runs = [{"wall": [], "cpu": [], "stage": None if s is None else [], "out": None} for s in timers]
    with torch.no_grad():
        for _, model in models:
            for _ in range(warmup):
                model(inputs)
        for _ in range(repeats):
            for (_, model), spent, run in zip(models, timers, runs):
                if spent is not None:
                    spent[0] = 0.0
                sync()
                t, c = time.perf_counter(), time.process_time()
                out = model(inputs)
                sync()
                run["wall"].append(time.perf_counter() - t)
                run["cpu"].append(time.process_time() - c)
                if spent is not None:
                    run["stage"].append(spent[0])
                run["out"] = out[0]["instances"].to("cpu")
    return [(r["wall"], r["cpu"], r["stage"], r["out"]) for r in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["pointins", "sparseinst", "pointrend"])
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="the image size (default: pointins 800 1333, sparseinst 640 640, pointrend 800 1088)")
    p.add_argument("--depth", type=int, default=50, choices=[50, 101], help="ResNet depth of every model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per model (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    h, w = args.input_size or {"pointins": (800, 1333), "sparseinst": (640, 640), "pointrend": (800, 1088)}[args.method]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import d2seg  # noqa: F401  (registers the meta-architectures)

    models = build_models(args.method, args.depth, args.device)
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image.to(args.device), "height": h, "width": w}]
    runs = time_models(models, inputs, args.warmup, args.repeats, args.device)

    base = statistics.median(runs[0][0])
    print(f"R-{args.depth}-FPN, input {h}x{w}, {torch.get_num_threads()} thread(s), {args.device}, "
          f"torch {torch.__version__}, random weights, score thresholds 0; median of {args.repeats} "
          f"after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    print("| model | median s/img | min s/img | median CPU s/img | of which mask stage | detections | time / "
          f"{models[0][0]} |")
    print("|---|---|---|---|---|---|---|")
    for (name, _), (wall, cpu, stage, out) in zip(models, runs):
        med = statistics.median(wall)
        mask = f"{statistics.median(stage):.3f}" if stage is not None else "-"
        print(f"| {name} | {med:.3f} | {min(wall):.3f} | {statistics.median(cpu):.3f} | {mask} | {len(out)} "
              f"| {med / base:.2f} |")
    if args.method == "pointrend":
        a, b = runs[0][3], runs[1][3]
        same = len(a) == len(b) and torch.equal(a.scores, b.scores)
        pix = (a.pred_masks != b.pred_masks).sum().item() if same else "-"
        print(f"same weights: identical scores {same}; pasted mask pixels that differ: {pix}"
              + (f" of {a.pred_masks.numel()}" if same else ""))
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
