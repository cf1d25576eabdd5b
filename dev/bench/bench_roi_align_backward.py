#!/usr/bin/env python
"""Time torchvision's CPU RoIAlign backward against d2seg's (csrc/roi_align/), alternating in
one process on the same inputs, and check that the gradients are identical.

    OMP_NUM_THREADS=1 python dev/bench/bench_roi_align_backward.py

Importing d2seg leaves torchvision's kernel registered, so that both can be called.
Shapes are those of the shapes yardstick's heads (Mask R-CNN, batch 4, 128 px images, P2).
"""
import argparse
import os
import time

import torch

import d2seg  # noqa: F401
from d2seg.layers.roi_align import fast_roi_align_backward_active, roi_align_backward


def make_case(gen, K, C, H, W, P, scale, images=4):
    x0 = torch.rand(K, generator=gen) * W / scale * 0.7
    y0 = torch.rand(K, generator=gen) * H / scale * 0.7
    side = 8 + torch.rand(K, generator=gen) * 40
    rois = torch.stack([torch.randint(0, images, (K,), generator=gen).float(), x0, y0, x0 + side, y0 + side], 1)
    return (torch.randn(K, C, P, P, generator=gen), rois, scale, P, P, images, C, H, W, 0, True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if fast_roi_align_backward_active():
        raise SystemExit("d2seg's kernel replaces torchvision's in this process: nothing to compare")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cases = {
        "box head: 512 RoIs, 7x7, 64 ch, 4x64x32x32": make_case(gen, 512, 64, 32, 32, 7, 0.25),
        "mask head: 128 RoIs, 14x14, 64 ch, 4x64x32x32": make_case(gen, 128, 64, 32, 32, 14, 0.25),
    }
    print(f"threads {args.threads}, median of {args.reps}, torch {torch.__version__}")
    for name, a in cases.items():
        tv, ds = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            ref = torch.ops.torchvision._roi_align_backward(*a)
            tv.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = roi_align_backward(*a)
            ds.append(time.perf_counter() - t)
            if not torch.equal(ref, out):
                raise SystemExit(f"{name}: gradients differ (max {(ref - out).abs().max():.3g})")
        tv.sort()
        ds.sort()
        m = args.reps // 2
        print(f"{name}: torchvision {tv[m] * 1e3:.1f} ms, d2seg {ds[m] * 1e3:.1f} ms, "
              f"ratio {tv[m] / ds[m]:.1f}x, gradients identical")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
