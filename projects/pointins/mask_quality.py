"""Mask quality of a trained model given its boxes: for each ground-truth instance of a
data set, its best detection by box IoU (>= ``--min-box-iou``), the IoU of the pasted
predicted mask with the GT mask, and, for reference, the IoU of the detected box filled as
a mask. Separates "masks are bad" from "boxes are bad" when mask AP trails box AP.

    python -m d2seg.pointins.mask_quality --config-file configs/PointINS/pointins_fcos_R18_shapes.yaml \\
        --weights output/PointINS/pointins_fcos_R18_shapes/model_final.pth --num-images 60

Works with any d2seg / Detectron2 instance-segmentation model that returns image-sized
``pred_masks``; ``--small-area`` (px^2) splits small from larger GT masks.
"""
import argparse

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou

import d2seg  # noqa: F401  (registers models and data sets)
from d2seg.config import get_d2seg_cfg

__all__ = ["mask_quality", "main"]


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def mask_quality(cfg, dataset: str, num_images: int, min_box_iou: float = 0.5, small_area: float = 400.0):
    """Returns (mask IoUs, filled-box IoUs, is_small) arrays over the matched GTs."""
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = DatasetMapper(cfg, is_train=False)
    mask_ious, box_ious, small = [], [], []
    with torch.no_grad():
        for d in DatasetCatalog.get(dataset)[:num_images]:
            out = model([mapper(d)])[0]["instances"].to("cpu")
            gt = annotations_to_instances(d["annotations"], (d["height"], d["width"]), mask_format="bitmask")
            if len(out) == 0 or len(gt) == 0:
                continue
            best, j = pairwise_iou(gt.gt_boxes, out.pred_boxes).max(dim=1)
            for g in range(len(gt)):
                if best[g] < min_box_iou:
                    continue
                gm = gt.gt_masks.tensor[g]
                x0, y0, x1, y1 = out.pred_boxes.tensor[j[g]].round().long().tolist()
                filled = torch.zeros_like(gm)
                filled[y0:y1, x0:x1] = True
                mask_ious.append(_iou(out.pred_masks[j[g]].bool(), gm))
                box_ious.append(_iou(filled, gm))
                small.append(gm.sum().item() < small_area)
    return np.array(mask_ious), np.array(box_ious), np.array(small, dtype=bool)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--dataset", default=None, help="default: the config's first DATASETS.TEST")
    p.add_argument("--num-images", type=int, default=60)
    p.add_argument("--min-box-iou", type=float, default=0.5)
    p.add_argument("--small-area", type=float, default=400.0)
    args = p.parse_args(argv)
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.MODEL.WEIGHTS = args.weights
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    m, b, s = mask_quality(cfg, dataset, args.num_images, args.min_box_iou, args.small_area)
    if len(m) == 0:
        print("no GT matched by a detection")
        return
    mean = lambda x: float(x.mean()) if len(x) else float("nan")  # noqa: E731
    print(f"{dataset}: {len(m)} matched GTs; mean mask IoU {mean(m):.3f}, filled-box IoU {mean(b):.3f}; "
          f"small (< {args.small_area:g} px^2, {int(s.sum())}): mask {mean(m[s]):.3f} / box {mean(b[s]):.3f}; "
          f"larger: mask {mean(m[~s]):.3f} / box {mean(b[~s]):.3f}")


if __name__ == "__main__":
    main()
