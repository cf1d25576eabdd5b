#!/usr/bin/env python
"""Export a d2seg model to one ONNX file with its whole inference (post-processing included),
check it under ONNX Runtime against PyTorch on one image, and print what the file holds.

    python tools/export_model.py --config-file configs/FCOS/fcos_R18_shapes.yaml \
        --output fcos.onnx --dynamic MODEL.WEIGHTS output/FCOS/fcos_R18_shapes/model_final.pth
    python tools/export_model.py --config-file X.yaml --output x.onnx --height 640 --width 640 [KEY VALUE ...]

Without --height/--width or --dynamic, the graph has dynamic height and width where the
method allows it (docs/deploy.md), else the size INPUT.MIN_SIZE_TEST squared. Run the file
with d2seg.deploy.ONNXPredictor, tools/demo.py --onnx, or evaluate it with
tools/train_net.py --eval-only --onnx FILE. A module without an ONNX export (deformable
convolution) stops the export with an error naming it.
"""
import argparse
import logging
import sys

import torch
from detectron2.utils.logger import setup_logger

import d2seg  # noqa: F401  (registers every method)
from d2seg.deploy import DEFAULT_OPSET, ExportError, ONNXModel, export_onnx
from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg


def get_parser():
    p = argparse.ArgumentParser(description="Export a d2seg model to ONNX (with its post-processing)")
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--dynamic", action="store_true", help="dynamic input height and width")
    size.add_argument("--height", type=int, help="fixed input height (with --width)")
    p.add_argument("--width", type=int, help="fixed input width (with --height)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="also time N runs of PyTorch and of ONNX Runtime on one image at the export size "
                        "(or INPUT.MIN_SIZE_TEST x MAX_SIZE_TEST rounded), one thread each; prints the medians")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def check_against_pytorch(model, path, cfg, height, width):
    """One synthetic image through PyTorch and ONNX Runtime; returns a one-line summary."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=g) * 255
    inputs = [{"image": image, "height": height, "width": width}]
    with torch.no_grad():
        ref = model(inputs)[0]
    out = ONNXModel(path, cfg)(inputs)[0]
    if "sem_seg" in ref:
        agree = (ref["sem_seg"].argmax(0) == out["sem_seg"].argmax(0)).float().mean()
        return f"semantic argmax agreement {float(agree) * 100:.2f}% on a {height}x{width} image"
    a, b = ref["instances"], out["instances"]
    text = f"{len(a)} detections in PyTorch, {len(b)} in ONNX Runtime on a {height}x{width} noise image"
    if len(a) and len(a) == len(b):
        diff = (a.scores.sort().values - b.scores.sort().values).abs().max()
        text += f", largest score difference {float(diff):.2e}"
    return text


def benchmark(model, path, cfg, height, width, runs):
    """Median seconds per image of PyTorch (``model``) and ONNX Runtime (``path``), one thread
    each, after one warm-up run, on a (height, width) noise image: (torch_s, onnxruntime_s)."""
    import statistics
    import time

    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, height, width, generator=g) * 255, "height": height, "width": width}]
    onnx_model = ONNXModel(path, cfg, num_threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {}
        for name, fn in (("torch", model), ("onnxruntime", onnx_model)):
            fn(inputs)  # warm-up
            t = []
            for _ in range(runs):
                start = time.perf_counter()
                with torch.no_grad():
                    fn(inputs)
                t.append(time.perf_counter() - start)
            times[name] = statistics.median(t)
    finally:
        torch.set_num_threads(threads)
    return times["torch"], times["onnxruntime"]


def main(argv=None):
    args = get_parser().parse_args(argv)
    if (args.height is None) != (args.width is None):
        print("error: give both --height and --width (or --dynamic)", file=sys.stderr)
        return 2
    setup_logger(name="d2seg")
    logger = logging.getLogger("d2seg")
    cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    model = Trainer.build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights")
    try:
        graph = export_onnx(model, args.output, cfg, height=args.height, width=args.width,
                            dynamic=True if args.dynamic else None, opset=args.opset)
    except (ExportError, ValueError) as e:
        print(f"error: {args.config_file}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: inputs images (1, 3, H, W) float32 {cfg.INPUT.FORMAT} 0-255 and output_size (2,) "
          f"int64; outputs {', '.join(graph.output_names)}")
    if not args.no_check:
        div = graph.size_divisibility
        side = -(-int(cfg.INPUT.MIN_SIZE_TEST) // div) * div
        print("check: " + check_against_pytorch(model, args.output, cfg, args.height or side, args.width or side))
    if args.benchmark:
        div = graph.size_divisibility
        h = args.height or -(-int(cfg.INPUT.MIN_SIZE_TEST) // div) * div
        w = args.width or -(-int(cfg.INPUT.MAX_SIZE_TEST) // div) * div
        t_torch, t_ort = benchmark(model, args.output, cfg, h, w, args.benchmark)
        print(f"benchmark {h}x{w}, 1 thread, median of {args.benchmark}: PyTorch {t_torch:.3f} s, "
              f"ONNX Runtime {t_ort:.3f} s ({t_torch / t_ort:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
