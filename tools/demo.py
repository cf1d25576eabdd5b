#!/usr/bin/env python
"""Run a d2seg (or Detectron2) model on images and write the visualised predictions.

    python tools/demo.py --config-file configs/quick/mask_rcnn_shapes.yaml \
        --input img1.jpg dir_of_images/ "more/*.png" --output out_dir/ \
        --confidence-threshold 0.5 --scale 4 --opts MODEL.WEIGHTS output/.../model_final.pth
    # the same in bfloat16 (a CPU with avx512_bf16 / amx_bf16; docs/deploy.md, "Precision")
    python tools/demo.py ... --opts MODEL.WEIGHTS ... TEST.PRECISION bfloat16

Runs on the CPU unless MODEL.DEVICE says otherwise (and a GPU is present). A file that is
not a readable image is reported with a clear message and skipped; the exit status is 1
if any input failed. Outputs are named <stem>.png, and <stem>_<ext>.png where inputs share
a stem (photo.jpg and photo.png keep both results); 16-bit images are scaled to 8 bits. An
image on which nothing scores above the threshold gets a warning with the highest score the
model gave.
"""
import argparse
import glob
import logging
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import d2seg  # noqa: F401  (registers every method and the built-in data sets)
from d2seg.config import flag_among_opts
from d2seg.data import read_image_8bit
from d2seg.engine import Predictor, setup_cfg
from d2seg.engine.drawing import draw_instances, draw_sem_seg, render

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    p = argparse.ArgumentParser(description="d2seg demo: visualise predictions on images")
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders of images, or glob patterns")
    p.add_argument("--output", required=True,
                   help="a folder (one output per input), or a file name when there is one input")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="minimum score of the instances drawn")
    p.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a COCO-format data set (for its class names: name it in DATASETS.TEST)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="scale of the output picture (e.g. 4 for the 128 px shapes images; default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--onnx", metavar="FILE", help="predict with this ONNX file (tools/export_model.py) on ONNX "
                   "Runtime instead of PyTorch; it must come from --config-file's model")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS path.pth")
    return p


def expand_inputs(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item)
                            if f.lower().endswith(IMAGE_EXTS))
        elif any(ch in item for ch in "*?["):
            paths += sorted(glob.glob(item))
        else:
            paths.append(item)
    return paths


def output_names(paths):
    """One distinct .png file name per input path: ``<stem>.png``, or, when several inputs
    share a stem (photo.jpg and photo.png, or a/x.jpg and b/x.jpg), ``<stem>_<ext>.png``
    and then a counter, so that no result overwrites another."""
    stems = [os.path.splitext(os.path.basename(p)) for p in paths]
    shared = {s for s, n in Counter(stem for stem, _ in stems).items() if n > 1}
    names, taken = [], set()
    for stem, ext in stems:
        name = f"{stem}_{ext.lstrip('.').lower()}" if stem in shared else stem
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names.append(name + ".png")
    return names


def output_path(args, name, n_inputs):
    """Where the result called ``name`` (from :func:`output_names`) is written."""
    if n_inputs == 1 and os.path.splitext(args.output)[1].lower() in IMAGE_EXTS:
        return args.output
    os.makedirs(args.output, exist_ok=True)
    return os.path.join(args.output, name)


def build_predictor(cfg, weights=None):
    """d2seg's :class:`d2seg.engine.Predictor` (a DefaultPredictor) of ``cfg`` with ``weights``
    (default: cfg.MODEL.WEIGHTS; none if empty), loaded by d2seg's checkpointer, run at
    cfg.TEST.PRECISION."""
    return Predictor(cfg, weights)


def visualise(image_rgb, predictions, metadata, threshold, scale=1.0):
    """(picture, number of instances drawn or None for a semantic map, highest score seen
    or None)."""
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    if "instances" in predictions:
        inst = predictions["instances"].to("cpu")
        best, keep = None, None
        if inst.has("scores"):
            best = float(inst.scores.max()) if len(inst) else None
            keep = inst.scores >= threshold
        # Detectron2's picture without copying the masks (a 3000x4000 photo's 100 masks are 1.1 GiB)
        return draw_instances(vis, inst, keep), int(keep.sum()) if keep is not None else len(inst), best
    if "sem_seg" in predictions:
        # Detectron2's picture without a float32 RGBA layer of the whole image per class
        return draw_sem_seg(vis, predictions["sem_seg"].argmax(dim=0).to("cpu")), None, None
    raise ValueError(f"the model returned neither 'instances' nor 'sem_seg': {list(predictions)}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if flag_among_opts(args.opts):
        parser.error(flag_among_opts(args.opts).replace("KEY VALUE", "--opts KEY VALUE"))
    setup_logger(name="d2seg")
    logger = setup_logger()
    from d2seg.data import register_coco_dataset

    for name, json_file, image_root in args.register_coco or []:
        register_coco_dataset(name, json_file, image_root)
    device = args.device if (args.device == "cpu" or torch.cuda.is_available()) else "cpu"
    cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", device])
    if args.onnx:
        from d2seg.deploy import ONNXPredictor

        predictor = ONNXPredictor(args.onnx, cfg)
    else:
        if not cfg.MODEL.WEIGHTS:
            logger.warning("MODEL.WEIGHTS is empty: predicting with randomly initialised weights")
        predictor = build_predictor(cfg)
    dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"
    metadata = MetadataCatalog.get(dataset)

    paths = expand_inputs(args.input)
    if not paths:
        print(f"error: no input images found in {args.input}", file=sys.stderr)
        return 1
    failed = 0
    for path, name in zip(paths, output_names(paths)):
        try:
            image = read_image_8bit(path, format="BGR")  # 16-bit images scaled, not saturated
        except Exception as e:  # PIL/OS errors: name the file, keep going
            failed += 1
            print(f"error: cannot read image '{path}': {type(e).__name__}: {e}", file=sys.stderr)
            continue
        start = time.perf_counter()
        predictions = predictor(image)
        elapsed = time.perf_counter() - start
        out, n, best = visualise(image[:, :, ::-1], predictions, metadata, args.confidence_threshold,
                                 args.scale)
        dst = output_path(args, name, len(paths))
        Image.fromarray(render(out)).save(dst)  # matplotlib's rendering of a photo costs ~110 bytes a pixel
        what = f"{n} instances" if n is not None else "semantic map"
        logger.info(f"{path}: {what} in {elapsed:.2f}s -> {dst}")
        if n == 0:
            seen = ("the model returned no instance at all" if best is None
                    else f"the highest score was {best:.3f}")
            logger.warning(f"{path}: nothing drawn: no instance scored >= --confidence-threshold "
                           f"{args.confidence_threshold:g} ({seen}); the picture shows the input "
                           "only. Lower the threshold, or train longer.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
