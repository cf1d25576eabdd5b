#!/usr/bin/env python
"""Draw what trained models see on the first images of a data set, one grid picture per
model, and count what they got right.

    python tools/gallery.py --model configs/quick/mask_rcnn_shapes.yaml output/quick/mask_rcnn_shapes/model_final.pth \
        --model configs/SOLO/solo_shapes.yaml output/SOLO/solo_shapes/model_final.pth \
        --num 6 --scale 2 --output docs/gallery/

For each ``--model CONFIG WEIGHTS`` it prepares the config's data sets as d2seg's Trainer
does (the built-in shapes sets with the config's ``D2SEG.SHAPES`` settings), runs the model
(as tools/demo.py does: d2seg's checkpointer, CPU unless --device cuda) on the first
``--num`` images of the config's first test set, draws each image's predictions above a score threshold (tools/demo.py's drawing),
and writes the pictures side by side (``--columns`` per row) as ``<output>/<config
stem>.jpg``. For instance models it then matches the drawn instances to the ground truth,
highest score first, each to the unmatched object it overlaps most if that IoU is at least
``--iou``: mask IoU, or box IoU for box-only detectors and for images whose ground truth has
boxes but no masks (the row's last column says which was used). It prints one Markdown
table row per model: objects in the images, found with the right class, found with a wrong
class, missed, drawn instances that matched nothing (duplicates and false positives), and
the IoU used. For
semantic models the row gives the pixel accuracy over the images. The threshold is
``--threshold`` if given; otherwise, per model, the one of 0.2, 0.3, ..., 0.7 with the best
F1 of "found with the right class" (2 right / (drawn + objects); a choice made on the shown
images, for the picture: the model's COCO AP does not depend on it). The rows
also go to ``<output>/gallery_rows.md``.
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.logger import setup_logger
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (tools/demo.py: the same drawing as the demo)

import d2seg  # noqa: E402,F401  (registers every method and the built-in data sets)
from d2seg.data import prepare_datasets, read_image_8bit  # noqa: E402
from d2seg.engine import setup_cfg  # noqa: E402

HEADER = ("| config | threshold | objects | right class | wrong class | missed | unmatched drawn | IoU |\n"
          "|---|---|---|---|---|---|---|---|")
AUTO_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs=2, action="append", required=True, metavar=("CONFIG", "WEIGHTS"),
                   help="a config and its trained weights (repeat for more models)")
    p.add_argument("--num", type=int, default=6, help="the first NUM images of the config's test set")
    p.add_argument("--threshold", type=float, default=None,
                   help="minimum score of the instances drawn and counted (default: per model, the one of "
                        f"{AUTO_THRESHOLDS} with the best F1 of objects found with the right class)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU at which a drawn instance finds an object")
    p.add_argument("--scale", type=float, default=2.0, help="scale of each picture (2: 256 px for shapes)")
    p.add_argument("--columns", type=int, default=3)
    p.add_argument("--output", required=True, help="folder for the pictures and gallery_rows.md")
    p.add_argument("--device", default="cpu")
    return p


def _iou_matrix(pred, gt):
    """IoU of every predicted against every ground-truth mask (bool arrays N x H x W, M x H x W)."""
    hw = gt.shape[1] * gt.shape[2]
    p = pred.reshape(len(pred), hw).astype(np.float64)
    g = gt.reshape(len(gt), hw).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1.0)


def _box_iou(pred, gt):
    """IoU of XYXY boxes (N x 4 against M x 4), as numpy."""
    return pairwise_iou(Boxes(torch.as_tensor(pred, dtype=torch.float64)),
                        Boxes(torch.as_tensor(gt, dtype=torch.float64))).numpy()


def count_matches(scores, classes, iou, gt_classes, thresh=0.5):
    """Greedy matching, highest score first: (right class, wrong class, missed, unmatched).
    ``iou`` is N (predictions) x M (objects)."""
    taken = np.zeros(len(gt_classes), dtype=bool)
    right = wrong = unmatched = 0
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        cand = np.where(~taken & (iou[i] >= thresh))[0] if iou.shape[1] else np.array([], dtype=int)
        if len(cand) == 0:
            unmatched += 1
            continue
        j = cand[np.argmax(iou[i, cand])]
        taken[j] = True
        if int(classes[i]) == int(gt_classes[j]):
            right += 1
        else:
            wrong += 1
    return right, wrong, int((~taken).sum()), unmatched


def _gt_of(record):
    """(classes, XYXY boxes, bool masks) of a record's objects, by Detectron2's own decoding
    (polygons or RLE); masks is None when some object has no "segmentation" (box-only
    ground truth: the objects are then matched by box IoU)."""
    anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    h, w = record["height"], record["width"]
    with_masks = all("segmentation" in a for a in anns)
    if not with_masks:
        anns = [{k: v for k, v in a.items() if k != "segmentation"} for a in anns]
    gt = annotations_to_instances(anns, (h, w), mask_format="bitmask")
    if not with_masks:
        masks = None
    elif gt.has("gt_masks"):
        masks = gt.gt_masks.tensor.numpy()
    else:  # no objects
        masks = np.zeros((0, h, w), dtype=bool)
    return gt.gt_classes.numpy(), gt.gt_boxes.tensor.numpy().astype(np.float64), masks


def _grid(pictures, columns):
    w, h = pictures[0].size
    rows = (len(pictures) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for k, pic in enumerate(pictures):
        grid.paste(pic.convert("RGB").resize((w, h)), ((k % columns) * w, (k // columns) * h))
    return grid


def f1(counts):
    """F1 of "found with the right class" from [objects, right, wrong, missed, unmatched drawn]."""
    objects, right, wrong, _, unmatched = (int(v) for v in counts)
    drawn = right + wrong + unmatched
    return 2.0 * right / max(drawn + objects, 1)


def _count_at(truth, threshold, iou_thresh):
    """([objects, right class, wrong class, missed, unmatched drawn] over the images, the IoU
    used: "mask", "box" or "mask, box" when it differed between images); ``truth``: ((classes,
    boxes, masks or None) of the objects, predictions) per image. Mask IoU where both the
    predictions and the truth have masks, box IoU otherwise."""
    totals = np.zeros(5, dtype=np.int64)
    used = set()
    for (gt_classes, gt_boxes, gt_masks), pred in truth:
        inst = pred["instances"].to("cpu")
        inst = inst[inst.scores >= threshold]
        if inst.has("pred_masks") and gt_masks is not None:
            iou = _iou_matrix(inst.pred_masks.numpy().astype(bool), gt_masks)
            used.add("mask")
        else:
            iou = _box_iou(inst.pred_boxes.tensor.numpy().astype(np.float64), gt_boxes)
            used.add("box")
        counts = count_matches(inst.scores.numpy(), inst.pred_classes.numpy(), iou, gt_classes, iou_thresh)
        totals += np.array([len(gt_classes), *counts])
    return totals, ", ".join(k for k in ("mask", "box") if k in used)


def run_model(config, weights, args, logger):
    """(row, picture path) of one model."""
    cfg = setup_cfg(config, ["MODEL.DEVICE", args.device])
    if not cfg.DATASETS.TEST:
        raise ValueError(f"{config}: DATASETS.TEST is empty; the gallery needs a test set with ground truth")
    prepare_datasets(cfg)  # as the Trainer: the built-in sets with the config's D2SEG.SHAPES
    predictor = demo.build_predictor(cfg, weights)
    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    records = DatasetCatalog.get(name)[: args.num]
    seen = []
    for rec in records:
        image = read_image_8bit(rec["file_name"], format="BGR")  # as training and the demo: 16 bits scaled
        seen.append((rec, image, predictor(image)))
    semantic = all("sem_seg" in pred and "instances" not in pred for _, _, pred in seen)
    if semantic:
        threshold, pix = args.threshold, [0, 0]
        for rec, _, pred in seen:
            label = np.asarray(Image.open(rec["sem_seg_file_name"]), dtype=np.int64)
            guess = pred["sem_seg"].argmax(0).cpu().numpy()
            valid = label != metadata.get("ignore_label", 255)
            pix[0] += int((guess[valid] == label[valid]).sum())
            pix[1] += int(valid.sum())
        cells = [f"pixel accuracy {100.0 * pix[0] / max(pix[1], 1):.1f} %", "", "", "", "", ""]
    else:
        candidates = AUTO_THRESHOLDS if args.threshold is None else (args.threshold,)
        truth = [(_gt_of(rec), pred) for rec, _, pred in seen]  # decoded once, counted per threshold
        per = {t: _count_at(truth, t, args.iou) for t in candidates}
        # auto: the best F1 of "found with the right class" (2 right / (drawn + objects)); ties: higher
        threshold = max(candidates, key=lambda t: (f1(per[t][0]), t))
        counts, used = per[threshold]
        cells = [str(int(v)) for v in counts] + [used]
    pictures = [Image.fromarray(demo.visualise(image[:, :, ::-1], pred, metadata, threshold,
                                               args.scale)[0].get_image()) for _, image, pred in seen]
    os.makedirs(args.output, exist_ok=True)
    dst = os.path.join(args.output, os.path.splitext(os.path.basename(config))[0] + ".jpg")
    _grid(pictures, args.columns).save(dst, quality=85)
    shown = os.path.relpath(config)
    thr = "–" if semantic else f"{threshold:g}"
    row = f"| `{shown}` | {thr} | " + " | ".join(cells) + " |"
    logger.info(f"{config}: {len(records)} images -> {dst}")
    return row, dst


def main(argv=None):
    """Leaves the process as it found it (grad mode, loggers): the tests call it in-process."""
    args = get_parser().parse_args(argv)
    logger = logging.getLogger("gallery")
    for config, weights in args.model:
        for path in (config, weights):
            if not os.path.isfile(path):
                print(f"error: file not found: {path}", file=sys.stderr)
                return 2
    rows = [HEADER]
    for config, weights in args.model:
        with torch.no_grad():
            row, _ = run_model(config, weights, args, logger)
        rows.append(row)
        print(row, flush=True)
    with open(os.path.join(args.output, "gallery_rows.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    setup_logger(name="gallery")
    setup_logger(name="d2seg")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    sys.exit(main())
