"""CPU inference time of PointINS (RetinaNet and FCOS variants) beside Detectron2's Mask
R-CNN, same backbone depth and input size, random weights, in one process (paper Table 10
compares trained models on a V100; this is the same comparison on this machine's CPU).

    python -m d2seg.pointins.benchmark --input-size 800 1333 --depth 50 --threads 1

Every score threshold is set to 0 and the last box-regression layers are set so that the
boxes are the anchors / proposals (FCOS: squares of 4 strides around the points), so that
every model returns TEST.DETECTIONS_PER_IMAGE (100) non-degenerate detections and computes
and pastes 100 masks: random weights would otherwise give almost no detection (or
degenerate boxes) and time almost no mask work. Models run one after the other on the same random image;
reported: median (and min) seconds per image over ``--repeats`` calls after ``--warmup``,
the median time of the mask stage alone (Mask R-CNN: ROIAlign + mask head + mask
inference; PointINS: templates at the points, instance-aware weights and convolution,
mask head; pasting into the image is outside both), and each model's median as a ratio of
Mask R-CNN's. Run it under the machine's CPU-slot
wrapper on a shared machine.
"""
import argparse
import statistics
import time

import torch

from detectron2 import model_zoo
from detectron2.modeling import build_model

import d2seg  # noqa: F401  (registers the meta-architectures)
from d2seg.config import get_d2seg_cfg

__all__ = ["benchmark_configs", "main"]

_POINTINS = {
    "PointINS-RetinaNet": "configs/PointINS/Base-PointINS-RetinaNet.yaml",
    "PointINS-FCOS": "configs/PointINS/Base-PointINS-FCOS.yaml",
}


def benchmark_configs(depth: int, repo: str = "."):
    """name -> cfg of Mask R-CNN (Detectron2's model zoo, FPN 1x) and both PointINS
    variants, all with ResNet-``depth``, random weights, every score threshold at 0."""
    cfgs = {}
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfgs["Mask R-CNN"] = cfg
    for name, path in _POINTINS.items():
        cfg = get_d2seg_cfg()
        cfg.merge_from_file(f"{repo}/{path}")
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
        cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0
        cfgs[name] = cfg
    for cfg in cfgs.values():
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.RESNETS.DEPTH = depth
        cfg.TEST.DETECTIONS_PER_IMAGE = 100
    return cfgs


def make_boxes_regular(model) -> None:
    """Zero the last box-regression layer (boxes = anchors / proposals; FCOS: distances of
    2 strides), so random weights give non-degenerate boxes."""
    from d2seg.fcos import OneStageDetector
    from detectron2.modeling import GeneralizedRCNN

    with torch.no_grad():
        if isinstance(model, GeneralizedRCNN):
            layers = [model.proposal_generator.rpn_head.anchor_deltas, model.roi_heads.box_predictor.bbox_pred]
            bias = 0.0
        elif isinstance(model, OneStageDetector):
            layers, bias = [model.proposal_generator.fcos_head.bbox_pred], 2.0
        else:
            layers, bias = [model.head.bbox_pred], 0.0
        for layer in layers:
            layer.weight.zero_()
            layer.bias.fill_(bias)


def _mask_stage_timer(model):
    """Wrap the model's mask stage (Mask R-CNN: ROIAlign + mask head + its inference;
    PointINS: templates, weights, instance-aware conv, mask head) to accumulate its time.
    Returns a list whose only element is the seconds spent there since the last reset."""
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        owner, name = model.roi_heads, "_forward_mask"
    else:
        owner = model.mask_branch if hasattr(model, "mask_branch") else model.mask_head.mask_branch
        name = "predict_points"
    fn = getattr(owner, name)
    spent = [0.0]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    setattr(owner, name, timed)
    return spent


def _time(model, inputs, warmup, repeats):
    spent = _mask_stage_timer(model)
    with torch.no_grad():
        for _ in range(warmup):
            out = model(inputs)
        times, mask_times = [], []
        for _ in range(repeats):
            spent[0] = 0.0
            t = time.perf_counter()
            out = model(inputs)
            times.append(time.perf_counter() - t)
            mask_times.append(spent[0])
    return times, mask_times, len(out[0]["instances"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    p.add_argument("--depth", type=int, default=50, choices=[50, 101])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = args.input_size
    inputs = [{"image": torch.rand(3, h, w) * 255, "height": h, "width": w}]
    rows = []
    for name, cfg in benchmark_configs(args.depth).items():
        model = build_model(cfg).eval()
        make_boxes_regular(model)
        times, mask_times, n = _time(model, inputs, args.warmup, args.repeats)
        rows.append((name, statistics.median(times), min(times), statistics.median(mask_times), n))
        del model
    base = rows[0][1]
    print(f"R-{args.depth}-FPN, input {h}x{w}, {args.threads} thread(s), CPU, random weights, "
          f"score thresholds 0; median of {args.repeats} after {args.warmup} warm-up")
    print("| model | median s/img | min s/img | of which mask stage | detections | time / Mask R-CNN |")
    print("|---|---|---|---|---|---|")
    for name, med, mn, mask, n in rows:
        print(f"| {name} | {med:.3f} | {mn:.3f} | {mask:.3f} | {n} | {med / base:.2f} |")
    return rows


if __name__ == "__main__":
    main()
