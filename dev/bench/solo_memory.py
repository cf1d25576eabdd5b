#!/usr/bin/env python
"""Peak memory of SOLO vs Decoupled SOLO (and SOLOv2) in training and inference, on
the same input, on the CPU.

What is measured: the process's resident-set high-water mark (``resource.getrusage``
``ru_maxrss``) in a FRESH subprocess per (config, mode), minus the resident set just
before the measured step (model built, input made, weights touched). So the number is
the extra memory that one training step (forward + backward) or one inference forward
needed. torch's CPU allocations are ordinary heap allocations, so RSS sees them
(``tracemalloc`` would not).

    python dev/bench/solo_memory.py                      # shapes configs, 128 px, batch 4
    python dev/bench/solo_memory.py --paper --size 512 --batch 1   # COCO R-50 configs

The input: ``--batch`` random images of ``--size`` px with 8 rectangles each (the same
seeded instances for every model).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = ["configs/SOLO/solo_shapes.yaml", "configs/SOLO/decoupled_solo_shapes.yaml",
          "configs/SOLO/solov2_shapes.yaml"]
PAPER = ["configs/SOLO/SOLO_R_50_1x.yaml", "configs/SOLO/Decoupled_SOLO_R_50_1x.yaml",
         "configs/SOLO/SOLOv2_R_50_1x.yaml"]


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _batch(size, batch, num_classes):
    import torch
    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        m = torch.zeros(8, size, size, dtype=torch.bool)
        for k in range(8):
            s = int(size * (0.08 + 0.4 * torch.rand(1, generator=g).item()))
            y, x = torch.randint(0, size - s, (2,), generator=g).tolist()
            m[k, y : y + s, x : x + s] = True
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(m)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.randint(0, num_classes, (8,), generator=g)
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return out


def worker(config, mode, size, batch, threads):
    import torch
    from detectron2.modeling import build_model

    import d2seg  # noqa: F401
    from d2seg.config import get_d2seg_cfg

    torch.set_num_threads(threads)
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = _batch(size, batch, cfg.MODEL.SOLO.NUM_CLASSES)
    for p in model.parameters():  # touch every page of the weights
        p.data.add_(0)
    before = _rss_kib()
    t = time.perf_counter()
    if mode == "train":
        model.train()
        losses = model(inputs)
        sum(losses.values()).backward()
    else:
        model.eval()
        with torch.no_grad():
            model([{"image": x["image"]} for x in inputs])
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"config": config, "mode": mode, "before_mib": before / 1024,
                      "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024,
                      "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--paper", action="store_true", help="use the COCO R-50 1x configs")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="*", default=["train", "test"])
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.size, args.batch, args.threads)
        return
    configs = args.configs or (PAPER if args.paper else SHAPES)
    print(f"input: {args.batch} x {args.size}x{args.size} px, 8 instances each; "
          f"peak RSS of a fresh process per row (ru_maxrss), minus RSS before the step")
    print("| config | mode | RSS before (MiB) | peak RSS (MiB) | step peak (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, mode,
                   "--size", str(args.size), "--batch", str(args.batch),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"| {config} | {mode} | failed: {res.stderr.strip().splitlines()[-1]} |||")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {os.path.basename(config)} | {mode} | {r['before_mib']:.0f} | "
                  f"{r['peak_mib']:.0f} | {r['step_mib']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
