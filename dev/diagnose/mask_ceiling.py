#!/usr/bin/env python
"""How much mask AP does each method's mask REPRESENTATION allow? An oracle on a COCO-format
data set (default ``shapes_val``).

The "predictions" are the ground-truth instances themselves (GT class, score 1.0, GT box),
whose GT masks go through a representation's bottleneck: GT bitmask + GT box -> the full-image
binary mask the method would output if its network predicted its training target exactly (for
the dense maps, which have no box-relative target: the area average of the GT at that stride,
or a logit map fitted to it, ``*_fit``). They are evaluated with Detectron2's COCOEvaluator
(pycocotools' COCOeval, ``segm``, RLE masks; ``use_fast_impl=False``) against the data set's
ground truth: the mask AP the method would get with perfect detection and classification and
its mask target hit exactly (for the box-based ones an upper bound as far as the network learns
its target; for the dense ones the area average is one choice of map, see ``*_fit``). Also printed: the mean IoU between each instance's
reconstruction and its GT mask, over all instances and over those with area < 32^2 (COCO's
"small": the GT mask's pixel count, which is the COCO ``area`` of shapes' annotations), and
how many reconstructions are empty (the object is lost entirely).

    OMP_NUM_THREADS=1 DETECTRON2_DATASETS=/work/main/datasets .venv/bin/python \\
        dev/diagnose/mask_ceiling.py [--dataset shapes_val] [--representations identity roi28 ...] \\
        [--output DIR]

Representations (what each one models, read from d2seg's code of the method):

``identity``
    The GT mask itself. A sanity check: AP 100.

``roi28`` -- Mask R-CNN (configs/quick/mask_rcnn_shapes.yaml: MaskRCNNConvUpsampleHead,
    14x14 pooler -> 28x28 masks). The training target Detectron2 builds,
    ``BitMasks.crop_and_resize(box, 28)`` (aligned ROIAlign of the GT bitmask in the box with
    adaptive sampling, then >= 0.5: a binary 28x28 mask), here in the GT box, pasted back with
    ``detectron2.layers.mask_ops.paste_masks_in_image`` at threshold 0.5, as Detectron2's
    ``detector_postprocess`` turns Mask R-CNN's 28x28 probabilities into image masks.
    (PointRend's 7x7 coarse head plus point refinement is not modelled.)

``stride4``, ``stride8`` -- a dense whole-image mask map at stride s: the GT bitmask
    (zero-padded at the bottom/right to a multiple of s, as ImageList pads) area-averaged over
    s x s cells (soft values in [0, 1]), upsampled with CondInst's inference path and
    thresholded at 0.5 (``> 0.5``, MODEL.CONDINST.MASK_THRESHOLD): CondInst computes its
    dynamic-head output at ``mask_feat_stride`` (8, P3), upsamples it by
    ``mask_feat_stride // MASK_OUT_STRIDE`` (2) to MASK_OUT_STRIDE (4), then the
    probabilities by MASK_OUT_STRIDE (4) to the input, both with
    ``d2seg.condinst.mask_branch.upsample(..., "centers")`` (bilinear, pixel centres aligned,
    ``F.interpolate(align_corners=False)``). So ``stride8`` is 8 -> 4 -> 1 (x2 then x4) and
    ``stride4`` is 4 -> 1 (x4). (CondInst upsamples logits in its first step and
    probabilities in the second; the oracle upsamples the area fractions in both.) Which
    methods output which stride in the shapes configs (from the code):

    * CondInst (condinst_R18_shapes.yaml): mask branch on P3-P5 fused at P3, dynamic head
      at stride 8, its logits upsampled x2 to MASK_OUT_STRIDE 4 (a bilinear upsample adds no
      detail): ``stride8``. Its loss targets are the GT sampled at the stride-4 pixel centres.
    * SparseInst (sparse_inst_r18_giam*_shapes.yaml): encoder output at stride 8 (C3's),
      mask logits = kernels x mask features at 1/8, upsampled by DECODER.SCALE_FACTOR 2 to
      1/4, then bilinearly to the input; threshold 0.45, not 0.5: ``stride8``.
    * SOLOv2 (solov2_shapes.yaml): the unified mask feature at P2's stride 4 (P3-P5
      upsampled into it), dynamic 1x1 kernels on it: ``stride4``.
    * SOLO and Decoupled SOLO (solo_shapes.yaml, decoupled_solo_shapes.yaml): per level,
      the feature resized to strides 8, 8, 16, 32, 32, the mask tower there, a x2 bilinear
      upsample, then the 1x1 (SOLO) / 3x3 (Decoupled) prediction conv: masks on stride 4, 4,
      8, 16, 16 grids. For SOLO the 1x1 conv is linear, so its masks are stride 8/8/16/32/32
      logits upsampled; objects with sqrt(wh) in [1, 48] (levels 0-1, most of shapes) get
      ``stride8`` information, larger ones coarser.
    * BlendMask's bases are at stride 4 (below).

``stride4_fit``, ``stride8_fit`` -- the same stride-s bottleneck with a better map than the
    area average (which is only one choice, and pessimistic: a small object's cells are all
    below 0.5 and vanish): the stride-s LOGIT map fitted per instance (Adam, 150 steps, on a
    soft IoU through CondInst's exact path: logits x (s // 4), sigmoid, probabilities x 4,
    > 0.5), starting from the area average's logits. A network of that output stride could
    output that map, so these are nearer the real ceiling of the resolution (not a proven
    maximum); they take most of the run time (about 30 s each on shapes_val, one thread).

``blendmask`` -- BlendMask (blendmask_R18_shapes.yaml: K=4 bases at 1/4 from P3-P5, the
    last 3x3 conv + ReLU at 1/4 so real stride-4 detail, BOTTOM_RESOLUTION R=56, ATTN_SIZE 7).
    The stride-4 soft map (area average, as ``stride4``) cropped to 56x56 in the GT box with
    BlendMask's own ``d2seg.blendmask.blender.crop_bases`` (aligned ROIAlign, POOLER_SCALES
    0.25, sampling ratio 1), pasted with ``paste_masks_in_image`` at MASK_THRESHOLD 0.5 (as
    its ``detector_postprocess``). The attentions are ignored (a basis that IS the object's
    stride-4 mask, full weight everywhere): a best case for the blender.

``meinst`` -- MEInst (meinst_R18_shapes.yaml: m=28, N=60, whitened, sigmoid). The training
    target (``crop_and_resize(box, 28)``, binary, as ``mask_targets_of_positives``) encoded
    with the PCA encoding learnt from shapes_train (``d2seg.meinst.encoding_for_config``:
    the cached $DETECTRON2_DATASETS/meinst/...npz, learnt on first use), v = T(logit(clamp(u,
    0.01, 0.99)) - mean), decoded u~ = sigmoid(W v + mean) as at inference, pasted into the box
    with ``paste_masks_in_image`` at 0.5 (OneStageDetector's ``detector_postprocess``).
"""
import argparse
import contextlib
import io
import json
import math
import os
import sys
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

import d2seg  # noqa: F401  (registers the methods and the shapes data sets)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.evaluation import COCOEvaluator
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import BitMasks, Boxes, Instances

from d2seg.blendmask.blender import crop_bases
from d2seg.condinst.mask_branch import upsample
from d2seg.meinst import MaskEncoding, MaskEncodingParams

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEINST_CONFIG = os.path.join(REPO, "configs", "MEInst", "meinst_R18_shapes.yaml")
REPRESENTATIONS = ("identity", "roi28", "stride4", "stride8", "blendmask", "meinst",
                   "stride4_fit", "stride8_fit")
METRICS = ("AP", "AP50", "AP75", "APs", "APm")
SMALL_AREA = 32 ** 2
MASK_THRESHOLD = 0.5  # every modelled method's (SparseInst's 0.45 aside)


# ------------------------------------------------------------------------------------------
# Representations: (G, H, W) bool GT masks + (G, 4) XYXY boxes -> (G, H, W) bool masks
# ------------------------------------------------------------------------------------------
def identity(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    return masks.clone()


def roi_mask(masks: torch.Tensor, boxes: torch.Tensor, size: int = 28,
             threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Mask R-CNN: Detectron2's binary size x size target in the box, pasted back."""
    if len(masks) == 0:
        return masks.clone()
    targets = BitMasks(masks).crop_and_resize(boxes, size).float()  # (G, size, size)
    return paste_masks_in_image(targets, Boxes(boxes), tuple(masks.shape[-2:]), threshold=threshold)


def stride_map(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """(G, 1, ceil(H/s), ceil(W/s)) area fractions of each s x s cell (zero padding)."""
    H, W = masks.shape[-2:]
    x = masks[:, None].float()
    x = F.pad(x, (0, (-W) % stride, 0, (-H) % stride))
    return F.avg_pool2d(x, stride)


def dense_mask(masks: torch.Tensor, boxes: torch.Tensor, stride: int, out_stride: int = 4,
               threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """A stride-``stride`` soft map upsampled as CondInst's inference does: by
    stride // out_stride to ``out_stride`` (MASK_OUT_STRIDE), then by out_stride."""
    H, W = masks.shape[-2:]
    if len(masks) == 0:
        return masks.clone()
    x = stride_map(masks, stride)
    out_stride = min(out_stride, stride)
    if stride % out_stride:
        raise ValueError(f"stride {stride} is not a multiple of the output stride {out_stride}")
    x = upsample(x, stride // out_stride, "centers")
    x = upsample(x, out_stride, "centers")[:, 0, :H, :W]
    return x > threshold


def _condinst_upsample(logits: torch.Tensor, stride: int, out_stride: int) -> torch.Tensor:
    """CondInst's path from stride-``stride`` logits to probabilities at the input:
    logits x (stride // out_stride), sigmoid, probabilities x out_stride."""
    x = upsample(logits, stride // out_stride, "centers").sigmoid()
    return upsample(x, out_stride, "centers")


def fitted_dense_mask(masks: torch.Tensor, boxes: torch.Tensor, stride: int, out_stride: int = 4,
                      steps: int = 150, lr: float = 0.1, sharpness: float = 20.0,
                      threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """The stride-``stride`` LOGIT map fitted to reproduce the GT mask through CondInst's
    upsampling (:func:`_condinst_upsample`) and the 0.5 threshold: Adam on a soft IoU
    between sigmoid(sharpness * (p - 0.5)) and the full-resolution GT, from the logits of the
    area fractions. A network of that output stride could produce this map, so its AP is
    nearer the representation's real ceiling than the area average (not a proven maximum).
    (Per-pixel BCE instead of the soft IoU gave worse masks than the area average.)"""
    H, W = masks.shape[-2:]
    if len(masks) == 0:
        return masks.clone()
    out_stride = min(out_stride, stride)
    target = F.pad(masks[:, None].float(), (0, (-W) % stride, 0, (-H) % stride))
    init = stride_map(masks, stride).clamp(0.02, 0.98)
    theta = (init.log() - (-init).log1p()).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            soft = torch.sigmoid((_condinst_upsample(theta, stride, out_stride) - threshold) * sharpness)
            inter = (soft * target).flatten(1).sum(1)
            union = (soft + target - soft * target).flatten(1).sum(1).clamp(min=1e-6)
            loss = (1 - inter / union).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        probs = _condinst_upsample(theta, stride, out_stride)
    return probs[:, 0, :H, :W] > threshold


def blendmask_mask(masks: torch.Tensor, boxes: torch.Tensor, stride: int = 4, resolution: int = 56,
                   sampling_ratio: int = 1, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """BlendMask, attentions ignored: the stride-4 soft map as a basis, cropped to
    resolution x resolution in the box with crop_bases, pasted back."""
    if len(masks) == 0:
        return masks.clone()
    bases = stride_map(masks, stride)  # (G, 1, Hb, Wb): instance g reads its own map
    im_inds = torch.arange(len(masks))
    rois = crop_bases(bases, boxes.float(), im_inds, resolution, 1.0 / stride, sampling_ratio)
    return paste_masks_in_image(rois[:, 0], Boxes(boxes), tuple(masks.shape[-2:]), threshold=threshold)


def meinst_mask(masks: torch.Tensor, boxes: torch.Tensor, encoding: MaskEncoding,
                threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """MEInst: the m x m target encoded and decoded with ``encoding``, pasted back."""
    if len(masks) == 0:
        return masks.clone()
    m = encoding.mask_size
    targets = BitMasks(masks).crop_and_resize(boxes, m).float()
    with torch.no_grad():
        probs = encoding.decode(encoding.encode(targets)).float()  # (G, m, m)
    return paste_masks_in_image(probs, Boxes(boxes), tuple(masks.shape[-2:]), threshold=threshold)


def meinst_encoding(config_file: str = MEINST_CONFIG, opts: Sequence[str] = ()) -> MaskEncoding:
    """The encoding MEInst trains with under ``config_file`` (d2seg's encoding_for_config:
    the cached file under $DETECTRON2_DATASETS/meinst/, learnt from DATASETS.TRAIN if missing)."""
    from d2seg.engine import setup_cfg
    from d2seg.meinst import encoding_for_config

    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts])
    return MaskEncoding.from_params(encoding_for_config(cfg)).eval()


def make_representations(names: Sequence[str], encoding: Optional[MaskEncoding] = None
                         ) -> Dict[str, Callable]:
    """name -> function (masks, boxes) -> masks. ``encoding``: MEInst's (needed for "meinst";
    None loads the shapes config's)."""
    unknown = [n for n in names if n not in REPRESENTATIONS]
    if unknown:
        raise ValueError(f"unknown representation(s) {unknown}; choose from {list(REPRESENTATIONS)}")
    table = {
        "identity": identity,
        "roi28": roi_mask,
        "stride4": lambda m, b: dense_mask(m, b, 4),
        "stride8": lambda m, b: dense_mask(m, b, 8),
        "blendmask": blendmask_mask,
        "stride4_fit": lambda m, b: fitted_dense_mask(m, b, 4),
        "stride8_fit": lambda m, b: fitted_dense_mask(m, b, 8),
    }
    if "meinst" in names:
        if encoding is None:
            encoding = meinst_encoding()
        elif isinstance(encoding, MaskEncodingParams):
            encoding = MaskEncoding.from_params(encoding).eval()
        table["meinst"] = lambda m, b: meinst_mask(m, b, encoding)
    return {n: table[n] for n in names}


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
def gt_instances(record: dict) -> Instances:
    """GT of one Detectron2 record (crowd annotations left out) as Detectron2's mapper
    builds it: gt_boxes (XYXY), gt_classes, gt_masks (BitMasks, full image)."""
    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    size = (record["height"], record["width"])
    if not annos:
        inst = Instances(size)
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
        inst.gt_classes = torch.zeros(0, dtype=torch.long)
        inst.gt_masks = BitMasks(torch.zeros(0, *size, dtype=torch.bool))
        return inst
    for a in annos:
        if "segmentation" not in a:
            raise ValueError(f"{record.get('file_name', '?')}: an annotation has no 'segmentation'")
    return detection_utils.annotations_to_instances(annos, size, mask_format="bitmask")


def mask_ious(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(G,) IoU of each reconstruction with its GT mask."""
    p, g = pred.flatten(1), gt.flatten(1)
    inter = (p & g).sum(1).float()
    union = (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def evaluate(dataset: str, representations: Dict[str, Callable], max_images: Optional[int] = None
             ) -> Dict[str, dict]:
    """{name: {AP, AP50, AP75, APs, APm, mIoU, mIoU_small, empty, instances, small_instances}}
    (``empty``: instances with a non-empty GT mask whose reconstruction is empty).

    Every representation's predictions are evaluated by its own COCOEvaluator (segm,
    pycocotools' COCOeval) against ``dataset``'s ground truth."""
    records = DatasetCatalog.get(dataset)
    if max_images is not None:
        records = records[:max_images]
    evaluators = {}
    for name in representations:
        ev = COCOEvaluator(dataset, tasks=("segm",), distributed=False, output_dir=None,
                           use_fast_impl=False)
        ev.reset()
        evaluators[name] = ev
    ious = {name: [] for name in representations}
    empties = {name: 0 for name in representations}
    areas = []
    for record in records:
        gt = gt_instances(record)
        masks, boxes = gt.gt_masks.tensor, gt.gt_boxes.tensor
        areas.append(masks.flatten(1).sum(1))
        for name, fn in representations.items():
            rec = fn(masks, boxes)
            if rec.shape != masks.shape:
                raise RuntimeError(f"representation {name} returned {tuple(rec.shape)} for masks "
                                   f"{tuple(masks.shape)}")
            ious[name].append(mask_ious(rec, masks))
            lost = masks.flatten(1).any(1) & ~rec.flatten(1).any(1)
            empties[name] += int(lost.sum())
            pred = Instances(gt.image_size)
            pred.pred_boxes = Boxes(boxes.clone())
            pred.scores = torch.ones(len(gt))
            pred.pred_classes = gt.gt_classes.clone()
            pred.pred_masks = rec
            evaluators[name].process([{"image_id": record["image_id"]}], [{"instances": pred}])
    areas = torch.cat(areas) if areas else torch.zeros(0)
    small = areas < SMALL_AREA
    out = {}
    for name, ev in evaluators.items():
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's prints
            res = ev.evaluate(img_ids=[r["image_id"] for r in records]) or {}
        segm = res.get("segm", {})
        iou = torch.cat(ious[name]) if ious[name] else torch.zeros(0)
        row = {k: float(segm.get(k, float("nan"))) for k in METRICS}
        row["mIoU"] = float(iou.mean()) if len(iou) else float("nan")
        row["mIoU_small"] = float(iou[small].mean()) if small.any() else float("nan")
        row["empty"] = empties[name]
        row["instances"] = int(len(iou))
        row["small_instances"] = int(small.sum())
        out[name] = row
    return out


def markdown_table(results: Dict[str, dict]) -> str:
    lines = ["| representation | AP | AP50 | AP75 | APs | APm | mean IoU | mean IoU (area < 32²) | empty masks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r[k]:.1f}" for k in METRICS] + [f"{r['mIoU']:.3f}", f"{r['mIoU_small']:.3f}",
                                                     str(r["empty"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes_val", help="a registered COCO-format data set")
    p.add_argument("--representations", nargs="+", default=list(REPRESENTATIONS),
                   choices=REPRESENTATIONS)
    p.add_argument("--meinst-config", default=MEINST_CONFIG,
                   help="config whose MEInst encoding 'meinst' uses (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--output", default=None, help="folder to write mask_ceiling.json into")
    args = p.parse_args(argv)

    if args.dataset not in DatasetCatalog.list():
        raise SystemExit(f"data set {args.dataset!r} is not registered "
                         f"(shapes_train/shapes_val are; register your own first)")
    enc = meinst_encoding(args.meinst_config) if "meinst" in args.representations else None
    reps = make_representations(args.representations, enc)
    results = evaluate(args.dataset, reps, args.max_images)
    table = markdown_table(results)
    n = next(iter(results.values()))
    print(f"Oracle mask AP on {args.dataset} ({n['instances']} instances, "
          f"{n['small_instances']} with area < 32²): GT class, box and score 1, masks through "
          f"each representation; pycocotools COCOeval segm.\n")
    print(table)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        path = os.path.join(args.output, "mask_ceiling.json")
        payload = {"dataset": args.dataset, "metadata_json": MetadataCatalog.get(args.dataset).get("json_file", None),
                   "meinst_config": args.meinst_config if enc is not None else None,
                   "results": results}
        with open(path, "w") as f:
            json.dump(_json_clean(payload), f, indent=2)
        print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
