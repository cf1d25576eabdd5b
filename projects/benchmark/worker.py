"""One measurement phase of one config, in a fresh process (spawned by tools/benchmark.py):

    python -m d2seg.benchmark.worker --phase infer|train --config-file X.yaml \
        --json-out result.json [--device cpu] [--threads 1] [--all-detections] \
        [--input-size H W] [--warmup N] [--repeats N] [--batch-size N] [KEY VALUE ...]

Writes a JSON object: the measurement (see d2seg.benchmark.measure) plus the config's
facts (meta-architecture, threads, keys changed), or {"error": "..."} on failure
(exit status 1).
"""
import argparse
import json
import os
import sys
import traceback


def build_cfg(config_file, opts, device, all_detections, phase, trained=False):
    from ..engine import setup_cfg
    from .configs import all_detections_opts

    cfg = setup_cfg(config_file, opts, freeze=False)
    cfg.MODEL.DEVICE = device
    changed = []
    if all_detections:
        extra = all_detections_opts(cfg)
        cfg.merge_from_list(extra)
        changed = extra[0::2]
    if trained and not cfg.MODEL.WEIGHTS:
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(final):
            cfg.MODEL.WEIGHTS = final
    if phase == "train":
        cfg.DATALOADER.NUM_WORKERS = 0  # batches are loaded before timing
    cfg.freeze()
    return cfg, changed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["infer", "train"], required=True)
    p.add_argument("--config-file", required=True)
    p.add_argument("--json-out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--all-detections", action="store_true")
    p.add_argument("--trained", action="store_true", help="load <OUTPUT_DIR>/model_final.pth when it exists")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def run(args):
    import torch
    from detectron2.utils.env import seed_all_rng

    import d2seg  # noqa: F401  (registers every method and the built-in data sets)

    from .measure import measure_inference, measure_training

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg, changed = build_cfg(args.config_file, args.opts, args.device, args.all_detections, args.phase,
                             args.trained)
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)
    if args.phase == "infer":
        result = measure_inference(cfg, args.warmup, args.repeats, args.batch_size, args.input_size)
    else:
        result = measure_training(cfg, args.warmup, args.repeats, args.input_size)
    result.update(
        phase=args.phase,
        config_file=args.config_file,
        meta_architecture=cfg.MODEL.META_ARCHITECTURE,
        device=str(cfg.MODEL.DEVICE),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        device_name=torch.cuda.get_device_name(0) if str(cfg.MODEL.DEVICE).startswith("cuda") else "cpu",
        weights=cfg.MODEL.WEIGHTS or None,
        thresholds_set_to_zero=changed,
        loadavg_1min=os.getloadavg()[0],
    )
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
        code = 0
    except Exception as e:  # reported to the parent, which keeps going with other configs
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}", "phase": args.phase, "config_file": args.config_file}
        code = 1
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
