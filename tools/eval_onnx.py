#!/usr/bin/env python
"""Evaluate an exported ONNX file (tools/export_model.py) with Detectron2's evaluators, as
tools/train_net.py --eval-only evaluates a checkpoint: COCOEvaluator for instance models,
SemSegEvaluator for semantic ones, on DATASETS.TEST, through d2seg's test loader (the
config's test resize).

    python tools/eval_onnx.py --onnx fcos.onnx                        # the config stored in the file
    python tools/eval_onnx.py --onnx fcos.onnx --config-file configs/FCOS/fcos_R18_shapes.yaml \
        DATASETS.TEST "('shapes_val',)"                                # checked against the file

A config given must be the one the file was exported from (the model part: MODEL.* and
INPUT.FORMAT); data set and test keys may differ. Prints and returns Detectron2's results dict.
"""
import argparse
import sys

from detectron2.utils.logger import setup_logger

import d2seg  # noqa: F401  (registers every method and the built-in data sets)
from d2seg.deploy import ONNXModel
from d2seg.engine import Trainer, setup_cfg


def get_parser():
    p = argparse.ArgumentParser(description="Evaluate an ONNX file exported by d2seg with Detectron2's evaluators")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file (tools/export_model.py)")
    p.add_argument("--config-file", default="", metavar="FILE", help="default: the config stored in the file")
    p.add_argument("--num-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def evaluate(path, cfg=None, num_threads=0):
    """Detectron2's results dict of the file ``path`` on ``cfg.DATASETS.TEST`` (cfg: the stored
    one when None)."""
    model = ONNXModel(path, cfg, num_threads=num_threads)
    return Trainer.test(model.cfg, model)


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="d2seg")
    setup_logger()
    cfg = None
    if args.config_file or args.opts:
        if args.config_file:
            cfg = setup_cfg(args.config_file, args.opts)
        else:  # overrides on the stored config
            cfg = ONNXModel(args.onnx).cfg
            cfg.merge_from_list(list(args.opts))
    try:
        results = evaluate(args.onnx, cfg, args.num_threads)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
