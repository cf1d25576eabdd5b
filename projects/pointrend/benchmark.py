"""CPU inference speed of d2seg's PointRend against Detectron2's own PointRend project, with
the same weights on the same input, in one process (so the ratio is taken under the same
machine load). Also checks that both give the same masks.

    python -m d2seg.pointrend.benchmark                      # R-50-FPN, COCO (80 classes),
                                                             # 800x1088 image, 100 detections
    python -m d2seg.pointrend.benchmark --repeats 5 --height 800 --width 1088 --detections 100

The mask head is timed on the same features and the same detections (the part the two
implementations differ in), then the whole model (backbone, RPN, box head, mask head,
pasting the masks into the image). Runs alternate between the two and the median is kept.
Weights are random (no checkpoints can be downloaded here), scaled so that mask logits are
O(1) and the subdivision has real decisions to make.
"""
import argparse
import copy
import statistics
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import d2seg  # noqa: F401
from d2seg.pointrend import config_from_upstream, point_ops


def upstream_coco_cfg(num_classes=80, depth=50, detections=100):
    """Upstream's `InstanceSegmentation/pointrend_rcnn_R_50_FPN_1x_coco.yaml` model."""
    from detectron2.projects.point_rend import add_pointrend_config

    cfg = get_cfg()
    add_pointrend_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.ROI_HEADS.NAME = "PointRendROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep the detections
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.9
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
    cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
    cfg.MODEL.POINT_HEAD.NUM_CLASSES = num_classes
    return cfg


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.startswith("fpn_output"):
                p.mul_(0.01)  # random frozen-BN ResNets give huge activations
        for name, p in model.roi_heads.mask_head.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1088)
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-full-model", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    ucfg = upstream_coco_cfg(args.classes, args.depth, args.detections)
    up = build_model(ucfg).eval()
    randomize(up)
    ours = build_model(config_from_upstream(ucfg)).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"d2seg point sampling through compiled ops: {point_ops.compiled_ops_in_use()}")

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, args.height, args.width, generator=g) * 255
    inputs = [{"image": image, "height": args.height, "width": args.width}]
    with torch.no_grad():
        images = up.preprocess_image(inputs)
        features = up.backbone(images.tensor)
        proposals, _ = up.proposal_generator(images, features, None)
        dets, _ = up.roi_heads(images, features, proposals, None)
        dets = [d[: args.detections] for d in dets]
        n = len(dets[0])
        print(f"image {args.height}x{args.width}, {n} detections, {args.classes} classes")
        mfeat = {f: features[f] for f in up.roi_heads.mask_in_features}

        def run_up():
            inst = [copy.deepcopy(d) for d in dets]
            return up.roi_heads.mask_head(mfeat, inst)

        def run_ours():
            inst = [copy.deepcopy(d) for d in dets]
            return ours.roi_heads.mask_head(mfeat, inst)

        run_up(), run_ours()  # warm-up
        t_up, t_ours = [], []
        for _ in range(args.repeats):
            o_up, t = _time(run_up, 1)
            t_up += t
            o_ours, t = _time(run_ours, 1)
            t_ours += t
        m_up, m_ours = o_up[0].pred_masks, o_ours[0].pred_masks
        diff = (m_up - m_ours).abs().max().item()
        flips = ((m_up > 0.5) != (m_ours > 0.5)).sum().item()
        med_up, med_ours = statistics.median(t_up), statistics.median(t_ours)
        print(f"mask head  upstream {med_up:.3f}s  d2seg {med_ours:.3f}s  "
              f"speed-up x{med_up / med_ours:.2f}  (median of {args.repeats}; "
              f"runs up {['%.2f' % t for t in t_up]} ours {['%.2f' % t for t in t_ours]})")
        print(f"  masks {tuple(m_up.shape)}: max |p_up - p_ours| = {diff:.2e}, "
              f"pixels on different sides of 0.5: {flips} of {m_up.numel()}")

        if not args.skip_full_model:
            t_up, t_ours = [], []
            for _ in range(args.repeats):
                r_up, t = _time(lambda: up(inputs), 1)
                t_up += t
                r_ours, t = _time(lambda: ours(inputs), 1)
                t_ours += t
            a, b = r_up[0]["instances"], r_ours[0]["instances"]
            same_scores = torch.equal(a.scores, b.scores)
            pix = (a.pred_masks != b.pred_masks).sum().item()
            med_up, med_ours = statistics.median(t_up), statistics.median(t_ours)
            print(f"full model upstream {med_up:.3f}s  d2seg {med_ours:.3f}s  "
                  f"speed-up x{med_up / med_ours:.2f}  (median of {args.repeats})")
            print(f"  {len(a)} detections, identical scores: {same_scores}, "
                  f"pasted mask pixels that differ: {pix} of {a.pred_masks.numel()}")


if __name__ == "__main__":
    main()
