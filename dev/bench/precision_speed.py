#!/usr/bin/env python
"""Inference time of one model in float32 and at TEST.PRECISION bfloat16, alternating in one
process (so that the ratio is taken under the same machine load), random weights by default.

    # FCOS R-50 at 800x1216, one thread, median of 3 (docs/deploy.md, "Precision")
    OMP_NUM_THREADS=1 python dev/bench/precision_speed.py --config-file configs/FCOS/R_50_1x.yaml \
        --input-size 800 1216 --repeats 3 MODEL.WEIGHTS ""

The same model (float32 parameters) is run through :func:`d2seg.engine.at_precision` with
TEST.PRECISION float32 and bfloat16 (the path evaluation, tools/demo.py and tools/benchmark.py
take), on one noise image given at the input size (no test resize). After one untimed call
each, every round calls float32 then bfloat16. Prints per precision the median and min wall
seconds, the median process CPU seconds and the detections, and the float32 / bfloat16 ratio
of the medians.
"""
import argparse
import statistics
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import d2seg  # noqa: F401  (registers every method)
    from d2seg.engine import AtomicCheckpointer, Trainer, at_precision, setup_cfg

    runs = {}
    for precision in ("float32", "bfloat16"):
        cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu", "TEST.PRECISION", precision])
        runs[precision] = cfg
    model = Trainer.build_model(runs["float32"])
    if runs["float32"].MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(runs["float32"].MODEL.WEIGHTS)
    model.eval()
    runs = {p: at_precision(cfg, model) for p, cfg in runs.items()}
    h, w = args.input_size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float()
    inputs = [{"image": image, "height": h, "width": w}]

    wall = {p: [] for p in runs}
    cpu = {p: [] for p in runs}
    dets = {}
    with torch.no_grad():
        for run in runs.values():
            run(inputs)
        for _ in range(args.repeats):
            for p, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                out = run(inputs)
                wall[p].append(time.perf_counter() - t0)
                cpu[p].append(time.process_time() - c0)
                dets[p] = len(out[0]["instances"]) if "instances" in out[0] else None
    print(f"{args.config_file} at {h}x{w}, {torch.get_num_threads()} thread(s), {args.repeats} rounds, "
          f"torch {torch.__version__}")
    for p in runs:
        print(f"  {p:9s} median {statistics.median(wall[p]):.3f} s, min {min(wall[p]):.3f} s, "
              f"CPU median {statistics.median(cpu[p]):.3f} s, detections {dets[p]}")
    ratio = statistics.median(wall["float32"]) / statistics.median(wall["bfloat16"])
    cpu_ratio = statistics.median(cpu["float32"]) / statistics.median(cpu["bfloat16"])
    print(f"  float32 / bfloat16: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
