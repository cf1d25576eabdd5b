#!/usr/bin/env python
"""Pretrain the shapes configs' ResNet-18-GN backbone as a shape-crop classifier.

    python tools/pretrain_backbone.py                      # the cached d2seg://shapes/R18-GN-pretrained
    python tools/pretrain_backbone.py --output my.pth --iters 300 --num-images 500

Without --output it makes (or finds) the checkpoint that ``MODEL.WEIGHTS
d2seg://shapes/R18-GN-pretrained`` loads, under $DETECTRON2_DATASETS/shapes_pretrained/
(about 15 minutes on one core, once). With --output it writes a checkpoint of the given
recipe there (for experiments); ``MODEL.WEIGHTS /path/to/it.pth`` loads it the same way.
The held-out accuracy is logged and written beside the checkpoint (.json).
See docs/results.md ("A pretrained backbone") for what it does to every method.
"""
import argparse
import dataclasses
import logging
import os
import sys

from detectron2.utils.logger import setup_logger


def main(argv=None):
    from d2seg.data.pretrained import RECIPES, ensure_pretrained, pretrain_backbone, save_checkpoint

    default = RECIPES["R18-GN-pretrained"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None,
                        help="checkpoint to write (default: the d2seg://shapes/R18-GN-pretrained cache)")
    for field in dataclasses.fields(default):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default, help=f"recipe (default {field.default})")
    args = parser.parse_args(argv)
    setup_logger(name="d2seg")
    log = logging.getLogger("d2seg")
    recipe = type(default)(**{f.name: getattr(args, f.name) for f in dataclasses.fields(default)})
    if args.output is None:
        if recipe != default:
            parser.error("a changed recipe needs --output (the cache holds the default recipe)")
        path = ensure_pretrained("R18-GN-pretrained")
    else:
        state, stats = pretrain_backbone(recipe)
        save_checkpoint(args.output, state, recipe, stats)
        path = args.output
    log.info(f"Pretrained backbone: {os.path.abspath(path)}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
