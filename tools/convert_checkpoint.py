#!/usr/bin/env python
"""Convert a foreign checkpoint to a d2seg (Detectron2-style) checkpoint.

    python tools/convert_checkpoint.py --from adelaidet \\
        --config-file configs/CondInst/R_50_1x.yaml CondInst_MS_R_50_1x.pth condinst_r50.pth

``--from``: adelaidet (FCOS, MEInst, CondInst, BlendMask, SOLOv2), sparseinst
(hustvl/SparseInst), pointrend-upstream (Detectron2's PointRend project), or auto.
The input may be a local file, an URL or ``d2seg://<name>`` (checked download, see
docs/model_zoo.md). The output is ``{"model": state_dict, "__author__": ...}``.

The model of ``--config-file`` (plus KEY VALUE overrides at the end) is built and the
converted state dict must fit it exactly: otherwise nothing is written, the missing,
unexpected and mis-shaped keys are listed, and the exit status is 1.
"""
import argparse
import logging
import os
import sys

import torch

logger = logging.getLogger("d2seg.convert_checkpoint")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", default="auto",
                   choices=["auto", "adelaidet", "sparseinst", "pointrend-upstream"])
    p.add_argument("--converter", default=None, help="force one converter by name (see --list)")
    p.add_argument("--config-file", metavar="FILE",
                   help="d2seg config of the target model (a path, or relative to configs/)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle in full a file needing more than arrays and containers (trusted files only)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="use an URL / zoo entry whose sha256 is unknown")
    p.add_argument("--list", action="store_true", help="list the converters and exit")
    p.add_argument("input", nargs="?")
    p.add_argument("output", nargs="?")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def build_target_state(config_file, opts):
    from detectron2.modeling import build_model

    import d2seg  # noqa: F401
    from d2seg.engine import setup_cfg
    from d2seg.model_zoo import get_config_file

    if not os.path.isfile(config_file):
        config_file = get_config_file(config_file)
    cfg = setup_cfg(config_file, opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).state_dict()


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from d2seg.model_zoo import (
        convert_state_dict, list_converters, load_checkpoint_file, resolve_weights,
    )
    from d2seg.model_zoo.converters import compare_with_model, mismatch_message

    if args.list:
        for c in list_converters():
            print(f"{c.name:24s} --from {c.source:20s} {c.description}")
        return 0
    if not (args.input and args.output and args.config_file):
        print("error: input, output and --config-file are required", file=sys.stderr)
        return 2
    try:
        local, _ = resolve_weights(args.input, allow_unverified=args.allow_unverified or None)
        ckpt = load_checkpoint_file(local, allow_pickle=args.allow_pickle or None)
        target = build_target_state(args.config_file, args.opts)
        result = convert_state_dict(ckpt, source=args.source, target_keys=target.keys(),
                                    converter=args.converter)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    conv = result.converter.name if result.converter else "none (keys kept as they are)"
    logger.info(f"converter: {conv}")
    for src, dst in sorted(result.renamed.items()):
        logger.info(f"  {src} -> {dst}")
    for src, why in sorted(result.dropped.items()):
        logger.info(f"  dropped {src}: {why}")
    for dst, src in sorted(result.added.items()):
        logger.info(f"  created {dst} (from {src})")
    missing, unexpected, shapes = compare_with_model(result.state_dict, target)
    if missing or unexpected or shapes:
        print("error: " + mismatch_message(missing, unexpected, shapes,
                                           f"the converted checkpoint ({conv})")
              + f"\nnothing was written to {args.output}", file=sys.stderr)
        return 1
    out = {"model": result.state_dict, "__author__": f"d2seg convert_checkpoint ({conv})",
           "source": args.input}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, args.output)
    logger.info(f"{result.summary()}; all {len(target)} model keys present -> wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
